//! `bccp generate` and `bccp ingest` end to end, each body against SQLite and a throwaway
//! PostgreSQL server: counts per day, user labels at the requested accuracy, the streaming
//! rate, bad images and duplicates, Ctrl-C, a connection killed under the generator.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bccp::data::{read_manifest, Day};
use bccp::store::{SampleFilter, SampleStatus, Split};
use common::pg::{Backend, TestDb};
use common::{bccp, failure, success};

fn by_source(source: &str) -> SampleFilter {
    SampleFilter {
        source: Some(source.into()),
        ..SampleFilter::default()
    }
}

/// A prepared dataset of `classes` × `per_class` distinct 16×16 images.
fn prepared_tiny(dir: &Path, classes: usize, per_class: usize) -> PathBuf {
    let source = dir.join("source");
    for c in 0..classes {
        let class_dir = source.join(format!("c{c:02}"));
        std::fs::create_dir_all(&class_dir).unwrap();
        for k in 0..per_class {
            let img = image::RgbImage::from_fn(16, 16, |x, y| {
                image::Rgb([
                    (k % 256) as u8,
                    (k / 256 * 16 + c) as u8,
                    (x * 16 + y) as u8,
                ])
            });
            img.save(class_dir.join(format!("{k:04}.png"))).unwrap();
        }
    }
    let out = dir.join("tiny");
    success(&bccp(&[
        "prepare",
        "--source",
        source.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]));
    out
}

/// Generator counts per day equal the manifests; a second bulk run adds nothing.
fn generate_counts_per_day(db: &TestDb) {
    let days = common::prepared_small(db.dir.path());
    let args = [
        "generate",
        "-d",
        days.to_str().unwrap(),
        "--db",
        &db.url,
        "--bulk",
    ];
    let out = success(&bccp(&args));
    let expected: Vec<usize> = [Day::Monday, Day::Tuesday]
        .iter()
        .map(|d| {
            read_manifest(&days.join(format!("{}.jsonl", d.as_str())))
                .unwrap()
                .len()
        })
        .collect();
    assert!(
        out.contains(&format!(
            "bulk monday {}, tuesday {}",
            expected[0], expected[1]
        )),
        "{out}"
    );
    let mut store = db.open();
    assert_eq!(
        store.count_samples(&by_source("monday")).unwrap(),
        expected[0] as u64
    );
    assert_eq!(
        store.count_samples(&by_source("tuesday")).unwrap(),
        expected[1] as u64
    );
    // The store's classes are the dataset's; with the default accuracy 1.0 labels are true.
    assert_eq!(store.classes().unwrap(), ["class0", "class1", "class2"]);
    let rows = store.samples(&SampleFilter::default(), 1000).unwrap();
    assert!(rows.iter().all(|s| s.label_true == Some(s.label_given)));
    assert!(rows.iter().all(|s| Path::new(&s.image_path).is_file()));
    // Each row's content hash is its file's, as `prepare` recorded it in the manifest.
    let file_hash = |path: &str| bccp::hash::sha256_hex(&std::fs::read(path).unwrap());
    for s in &rows {
        assert_eq!(s.sha256.as_deref(), Some(file_hash(&s.image_path).as_str()));
    }
    drop(store);

    let again = success(&bccp(&args));
    assert!(again.contains("bulk monday 0, tuesday 0"), "{again}");
    assert!(
        again.contains(&format!("({} already stored)", expected[0] + expected[1])),
        "{again}"
    );
    let total = db.open().count_samples(&SampleFilter::default()).unwrap();
    assert_eq!(total, (expected[0] + expected[1]) as u64);

    // One day only, into another store, from a manifest of an older version (no recorded
    // hashes): the files are hashed as they are read.
    let manifest = days.join("tuesday.jsonl");
    let old: String = std::fs::read_to_string(&manifest)
        .unwrap()
        .lines()
        .map(|line| {
            let mut record: serde_json::Value = serde_json::from_str(line).unwrap();
            assert!(record["sha256"].is_string(), "{record}");
            record.as_object_mut().unwrap().remove("sha256");
            format!("{record}\n")
        })
        .collect();
    std::fs::write(&manifest, old).unwrap();
    let other = db.another("tuesday_only");
    success(&bccp(&[
        "generate",
        "-d",
        days.to_str().unwrap(),
        "--db",
        &other,
        "--bulk",
        "--day",
        "tuesday",
    ]));
    let mut o = common::pg::open(&other);
    assert_eq!(o.count_samples(&by_source("monday")).unwrap(), 0);
    assert_eq!(
        o.count_samples(&by_source("tuesday")).unwrap(),
        expected[1] as u64
    );
    for s in o.samples(&SampleFilter::default(), 1000).unwrap() {
        assert_eq!(s.sha256.as_deref(), Some(file_hash(&s.image_path).as_str()));
    }
}

/// Tuesday's stored user labels agree with the true labels at the requested rate (within 5
/// binomial standard deviations); Monday's all agree; the same seed gives the same labels.
fn user_labels_at_the_requested_rate(db: &TestDb) {
    let days = prepared_tiny(db.dir.path(), 10, 60);
    let generate = |url: &str, seed: &str| {
        success(&bccp(&[
            "generate",
            "-d",
            days.to_str().unwrap(),
            "--db",
            url,
            "--bulk",
            "--user-accuracy",
            "0.7",
            "--seed",
            seed,
        ]))
    };
    generate(&db.url, "5");
    let mut store = db.open();
    let tuesday = store.samples(&by_source("tuesday"), 10_000).unwrap();
    let n = tuesday.len() as f64;
    assert!(n >= 250.0, "{n} Tuesday rows");
    let agree = tuesday
        .iter()
        .filter(|s| s.label_true == Some(s.label_given))
        .count() as f64;
    let sd = (n * 0.7 * 0.3).sqrt();
    assert!(
        (agree - 0.7 * n).abs() <= 5.0 * sd,
        "{agree} of {n} agree; expected {} ± {}",
        0.7 * n,
        5.0 * sd
    );
    assert!(tuesday.iter().all(|s| (0..10).contains(&s.label_given)));
    let monday = store.samples(&by_source("monday"), 10_000).unwrap();
    assert!(monday.iter().all(|s| s.label_true == Some(s.label_given)));
    // A tenth held out as the gate set (binomial, 5 sd), every gate row trusted.
    let all = (n as usize + monday.len()) as f64;
    let gate = store.count_samples(&SampleFilter::gate(None)).unwrap() as f64;
    assert!(
        (gate - 0.1 * all).abs() <= 5.0 * (all * 0.09).sqrt(),
        "{gate} gate rows of {all}"
    );

    let labels = |url: &str| -> Vec<(String, i64)> {
        common::pg::open(url)
            .samples(&by_source("tuesday"), 10_000)
            .unwrap()
            .into_iter()
            .map(|s| (s.key, s.label_given))
            .collect()
    };
    let same = db.another("same_seed");
    generate(&same, "5");
    assert_eq!(labels(&same), labels(&db.url));
    let other = db.another("other_seed");
    generate(&other, "6");
    assert_ne!(labels(&other), labels(&db.url));
}

/// `--rate 25/s --duration 2s` adds 50 rows (± 1) and takes about 2 s.
fn rate_over_a_bounded_duration(db: &TestDb) {
    let days = common::prepared_small(db.dir.path());
    let start = Instant::now();
    let out = success(&bccp(&[
        "generate",
        "-d",
        days.to_str().unwrap(),
        "--db",
        &db.url,
        "--rate",
        "25/s",
        "--duration",
        "2s",
    ]));
    let took = start.elapsed();
    let rows = db.open().count_samples(&SampleFilter::default()).unwrap();
    assert!((49..=51).contains(&rows), "{rows} rows; {out}");
    assert!(
        out.contains(&format!("streamed {rows} at 25 rows/s")),
        "{out}"
    );
    assert!(took >= Duration::from_millis(1900), "{took:?}");
    // Streamed records are drawn from the manifests and keep their true labels.
    let mut store = db.open();
    let sample = &store.samples(&SampleFilter::default(), 1).unwrap()[0];
    assert!(["monday", "tuesday"].contains(&sample.source.as_str()));
    assert!(sample.label_true.is_some());

    // --limit bounds by count.
    let out = success(&bccp(&[
        "generate",
        "-d",
        days.to_str().unwrap(),
        "--db",
        &db.url,
        "--rate",
        "1000/s",
        "--limit",
        "7",
    ]));
    assert!(out.contains("streamed 7"), "{out}");
    assert_eq!(
        db.open().count_samples(&SampleFilter::default()).unwrap(),
        rows + 7
    );
}

/// Ingest from a folder: corrupt and truncated images are stored as rejected with the reason
/// and reported, a copy of an image is a duplicate; a second ingest adds nothing; a JSON Lines
/// file with a missing image and a timestamp with an offset.
fn ingest_rejects_and_reports_bad_images_and_duplicates(db: &TestDb) {
    let root = db.dir.path().join("photos");
    common::make_folder(&root, &[3, 3]);
    std::fs::copy(root.join("class0/img000.png"), root.join("class1/copy.png")).unwrap();
    std::fs::write(root.join("class0/bad.png"), b"this is not an image").unwrap();
    let png = std::fs::read(root.join("class1/img001.png")).unwrap();
    std::fs::write(root.join("class1/trunc.png"), &png[..png.len() / 2]).unwrap();

    let args = [
        "ingest",
        "--db",
        &db.url,
        "--folder",
        root.to_str().unwrap(),
    ];
    let out = bccp(&args);
    let stdout = success(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stdout.contains("accepted 6, duplicates 1, rejected 2 (undecodable 2)"),
        "{stdout}"
    );
    assert!(stderr.contains("copy.png"), "{stderr}");
    assert!(
        stderr.contains("bad.png") && stderr.contains("trunc.png"),
        "{stderr}"
    );

    let mut store = db.open();
    let rows = store.samples(&SampleFilter::default(), 100).unwrap();
    assert_eq!(rows.len(), 8);
    let rejected: Vec<_> = rows
        .iter()
        .filter(|s| matches!(s.status, SampleStatus::Rejected(_)))
        .collect();
    assert_eq!(rejected.len(), 2);
    for r in &rejected {
        let reason = r.status.reason().unwrap();
        assert!(reason.starts_with("undecodable: "), "{reason}");
        assert!(reason.contains(&r.image_path), "{reason}");
    }
    assert!(rejected
        .iter()
        .any(|r| r.status.reason().unwrap().contains("truncated")));
    assert_eq!(store.classes().unwrap(), ["class0", "class1"]);
    let accepted: Vec<_> = rows
        .iter()
        .filter(|s| s.status == SampleStatus::Accepted)
        .collect();
    assert!(accepted
        .iter()
        .all(|s| s.label_true.is_none() && s.split == Split::Train));
    assert!(accepted
        .iter()
        .all(|s| s.label_given == i64::from(s.image_path.contains("/class1/"))));
    drop(store);

    let again = success(&bccp(&args));
    assert!(
        again.contains("accepted 0, duplicates 9, rejected 0"),
        "{again}"
    );

    // JSON Lines: a new image with a label name and an offset timestamp; a missing file.
    let new = db.dir.path().join("new.png");
    image::RgbImage::from_pixel(20, 20, image::Rgb([1, 2, 3]))
        .save(&new)
        .unwrap();
    let jsonl = db.dir.path().join("feed.jsonl");
    std::fs::write(
        &jsonl,
        "{\"path\": \"new.png\", \"label\": \"class1\", \"timestamp\": \"2024-01-01T09:00:00+09:00\"}\n\
         \n\
         {\"path\": \"missing.png\", \"label\": 0}\n",
    )
    .unwrap();
    let out = success(&bccp(&[
        "ingest",
        "--db",
        &db.url,
        "--jsonl",
        jsonl.to_str().unwrap(),
        "--source",
        "camera",
    ]));
    assert!(
        out.contains("accepted 1, duplicates 0, rejected 1 (unreadable 1)"),
        "{out}"
    );
    let mut store = db.open();
    let camera = store.samples(&by_source("camera"), 10).unwrap();
    assert_eq!(camera.len(), 2);
    assert_eq!(camera[0].timestamp, "2024-01-01T00:00:00Z");
    assert_eq!(camera[0].label_given, 1);
    assert!(camera[1].status.reason().unwrap().contains("missing.png"));

    // A malformed line is an error naming the line, before anything is written.
    std::fs::write(
        &jsonl,
        "{\"path\": \"new.png\", \"label\": 1}\n{\"path\": 3}\n",
    )
    .unwrap();
    let err = failure(&bccp(&[
        "ingest",
        "--db",
        &db.url,
        "--jsonl",
        jsonl.to_str().unwrap(),
    ]));
    assert!(err.contains("feed.jsonl, line 2"), "{err}");
    assert_eq!(store.count_samples(&SampleFilter::default()).unwrap(), 10);
}

/// SIGINT to a streaming generator: it stops between transactions, exits normally, and every
/// row it reports committed is in the store.
fn ctrl_c_keeps_committed_rows(db: &TestDb) {
    let days = common::prepared_small(db.dir.path());
    let child = Command::new(env!("CARGO_BIN_EXE_bccp"))
        .args([
            "generate",
            "-d",
            days.to_str().unwrap(),
            "--db",
            &db.url,
            "--rate",
            "40/s",
            "--duration",
            "forever",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    loop {
        // The store may not exist yet in the first moments.
        let rows = bccp::store::DbUrl::parse(&db.url)
            .ok()
            .and_then(|u| bccp::store::open(&u).ok())
            .and_then(|mut s| s.count_samples(&SampleFilter::default()).ok())
            .unwrap_or(0);
        if rows >= 10 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no rows streamed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    let stdout = success(&out);
    assert!(
        stdout.contains("stopped by signal 2, committed rows kept"),
        "{stdout}"
    );
    let streamed: u64 = stdout
        .split("streamed ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count in {stdout}"));
    assert!(streamed >= 10, "{stdout}");
    assert_eq!(
        db.open().count_samples(&SampleFilter::default()).unwrap(),
        streamed
    );
    if db.backend == Backend::Sqlite {
        let conn = rusqlite::Connection::open(db.dir.path().join("store.sqlite3")).unwrap();
        let check: String = conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(check, "ok");
    }
}

on_both_backends!(
    generate_counts_per_day,
    user_labels_at_the_requested_rate,
    rate_over_a_bounded_duration,
    ingest_rejects_and_reports_bad_images_and_duplicates,
    ctrl_c_keeps_committed_rows,
);

/// The generator's PostgreSQL connection is terminated again and again while it streams: it
/// reconnects, and the store holds exactly the rows its schedule made (no loss, no duplicate).
#[test]
fn generator_survives_killed_postgres_connections() {
    let db = TestDb::new(Backend::Postgres);
    let days = common::prepared_small(db.dir.path());
    let url = format!("{}?application_name=bccp-generator", db.url);
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let killer = {
        let mut client = db.server.as_ref().unwrap().client("bccp_test");
        let done = done.clone();
        std::thread::spawn(move || {
            let mut kills = 0usize;
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                kills += client
                    .query(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                         WHERE application_name = 'bccp-generator'",
                        &[],
                    )
                    .unwrap()
                    .len();
                std::thread::sleep(Duration::from_millis(150));
            }
            kills
        })
    };
    let out = bccp(&[
        "generate",
        "-d",
        days.to_str().unwrap(),
        "--db",
        &url,
        "--rate",
        "100/s",
        "--duration",
        "3s",
    ]);
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let kills = killer.join().unwrap();
    let stdout = success(&out);
    assert!(kills > 0, "no connection killed");
    assert!(stdout.contains("reconnects"), "{stdout}");
    let row = db
        .server
        .as_ref()
        .unwrap()
        .client("bccp_test")
        .query_one("SELECT COUNT(*), COUNT(DISTINCT ikey) FROM samples", &[])
        .unwrap();
    assert_eq!(
        (row.get::<_, i64>(0), row.get::<_, i64>(1)),
        (300, 300),
        "{stdout}"
    );
}

/// Bad flags fail with messages that name them.
#[test]
fn bad_flags_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let days = common::prepared_small(dir.path());
    let d = days.to_str().unwrap();
    let db = format!("sqlite:{}", dir.path().join("s.sqlite3").display());
    let err = failure(&bccp(&[
        "generate",
        "-d",
        d,
        "--db",
        "mysql://x/y",
        "--bulk",
    ]));
    assert!(
        err.contains("invalid --db") && err.contains("sqlite:PATH"),
        "{err}"
    );
    let err = failure(&bccp(&["generate", "-d", d, "--db", &db, "--rate", "5/s"]));
    assert!(
        err.contains("--duration") && err.contains("--limit"),
        "{err}"
    );
    let err = failure(&bccp(&[
        "generate", "-d", d, "--db", &db, "--rate", "fast", "--limit", "1",
    ]));
    assert!(err.contains("--rate"), "{err}");
    let err = failure(&bccp(&["generate", "-d", d, "--db", &db]));
    assert!(err.contains("--bulk") && err.contains("--rate"), "{err}");
    let err = failure(&bccp(&[
        "generate",
        "-d",
        d,
        "--db",
        &db,
        "--bulk",
        "--user-accuracy",
        "2",
    ]));
    assert!(err.contains("--user-accuracy"), "{err}");
    let err = failure(&bccp(&["ingest", "--db", &db]));
    assert!(err.contains("--folder") && err.contains("--jsonl"), "{err}");
}
