//! `bccp retrain` end to end on real Fashion-MNIST images and the real MobileNetV2 weights,
//! each body against SQLite and a throwaway PostgreSQL server: the gate rejects a challenger
//! trained on 10%-right labels naming the day that dropped and promotes a cleansed one; a
//! cycle killed with SIGKILL leaves no partial version, the alias and the offset unmoved, and
//! the next cycle works; two cycles at once are serialised; a corrupt image does not stop it.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bccp::registry::Registry;
use bccp::retrain::{offset_name, CHAMPION};
use bccp::store::RUNNING;
use common::fashion::{self, fashion_days};
use common::pg::TestDb;
use common::{asset, bccp, success};

const MODEL: &str = "loop";

fn generate(db: &TestDb, days: &Path, day: &str, accuracy: f64) {
    fashion::generate(&db.url, days, day, accuracy);
}

fn retrain_args(db: &TestDb, runs: &Path, cache: &Path, extra: &[&str]) -> Vec<String> {
    fashion::retrain_args(&db.url, MODEL, runs, cache, extra)
}

fn retrain(db: &TestDb, runs: &Path, cache: &Path, extra: &[&str]) -> String {
    fashion::retrain(&db.url, MODEL, runs, cache, extra)
}

fn champion(runs: &Path) -> Option<u32> {
    Registry::open(runs)
        .aliases(MODEL)
        .unwrap()
        .get(CHAMPION)
        .copied()
}

/// The gate: a challenger trained on Tuesday labels that are 10% right (no replay) is
/// rejected, naming Monday, and changes nothing; a cleansed challenger with replay, on labels
/// 70% right, is promoted in another store.
fn gate_rejects_bad_labels_and_promotes_cleansed(db: &TestDb) {
    let tmp = db.dir.path();
    let days = fashion_days(tmp, 200);
    let (runs, cache) = (tmp.join("runs"), tmp.join("cache"));
    generate(db, &days, "monday", 1.0);
    let first = retrain(db, &runs, &cache, &["--method", "none"]);
    assert!(first.contains("PROMOTED — first model"), "{first}");
    assert_eq!(champion(&runs), Some(1));
    let offset = db.open().offset(&offset_name(MODEL)).unwrap();
    assert!(offset.is_some());

    generate(db, &days, "tuesday", 0.1);
    let bad = retrain(
        db,
        &runs,
        &cache,
        &["--method", "none", "--sampling", "none"],
    );
    eprintln!("{first}{bad}");
    assert!(bad.contains("rejected: monday dropped from"), "{bad}");
    assert_eq!(champion(&runs), Some(1), "the alias stays");
    let mut store = db.open();
    assert_eq!(store.offset(&offset_name(MODEL)).unwrap(), offset);
    let rows = store.retrains().unwrap();
    assert_eq!(rows.last().unwrap().decision, "rejected");
    let reasons = rows.last().unwrap().reasons.to_string();
    assert!(reasons.contains("monday dropped"), "{reasons}");

    // Another store, labels 70% right: the cleansed challenger with replay wins.
    let other = TestDb {
        url: db.another("second"),
        dir: tempfile::tempdir().unwrap(),
        backend: db.backend,
        server: None,
    };
    let runs2 = tmp.join("runs2");
    generate(&other, &days, "monday", 1.0);
    retrain(&other, &runs2, &cache, &["--method", "none"]);
    generate(&other, &days, "tuesday", 0.7);
    // With bf16 products where the CPU has them: the cycle embeds in bf16 (a cache of its
    // own) and the version records it.
    let bf16 = bccp::ops::bf16_gemm::available();
    // Scored on a copy of the backbone fine-tuned on the champion's training set.
    let mut flags = vec![
        "--method",
        "bccp",
        "--cutoff-folds",
        "3",
        "--ratio",
        "0.75",
        "--cleanse-features",
        "tuned",
        "--cleanse-tune-epochs",
        "2",
        "--cleanse-normalise",
        "true",
    ];
    if bf16 {
        flags.extend(["--precision", "bf16"]);
    }
    let good = retrain(&other, &runs2, &cache, &flags);
    eprintln!("{good}");
    assert!(good.contains("PROMOTED — gate accuracy"), "{good}");
    assert!(good.contains("replayed"), "{good}");
    assert_eq!(champion(&runs2), Some(2));
    let record = Registry::open(&runs2)
        .read(&Registry::open(&runs2).resolve("loop@champion").unwrap())
        .unwrap();
    assert!(!record.split.trained_on.is_empty());
    // The default relabels what the cut-off flags.
    assert!(record.metrics.replayed > 0 && record.metrics.relabelled_by_cutoff > Some(0));
    assert_eq!(record.metrics.removed_by_cutoff, 0);
    let precision = if bf16 { "bf16" } else { "f32" };
    assert_eq!(record.params.precision.name(), precision);
    assert_eq!(
        (
            record.params.cleanse_features.name(),
            record.params.cleanse_normalise
        ),
        ("tuned", true)
    );
}

/// SIGKILL while a cycle runs: no partial version, alias and offset unmoved; the next cycle
/// marks the dead one abandoned and promotes.
fn killed_cycle_leaves_nothing_half_done(db: &TestDb) {
    let tmp = db.dir.path();
    let days = fashion_days(tmp, 30);
    let (runs, cache) = (tmp.join("runs"), tmp.join("cache"));
    generate(db, &days, "monday", 1.0);
    let args = retrain_args(
        db,
        &runs,
        &cache,
        &["--method", "bccp", "--cutoff-folds", "5"],
    );
    let mut child = Command::new(env!("CARGO_BIN_EXE_bccp"))
        .arg("--quiet")
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut store = db.open();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let running = store
            .retrains()
            .unwrap()
            .iter()
            .any(|r| r.decision == RUNNING);
        if running {
            child.kill().unwrap();
            break;
        }
        assert!(Instant::now() < deadline, "the cycle never started");
        assert!(
            child.try_wait().unwrap().is_none(),
            "finished before it could be killed"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait().unwrap();
    let registry = Registry::open(&runs);
    for v in registry.versions(MODEL) {
        let run = registry.resolve(&format!("{MODEL}:{v}")).unwrap();
        assert!(registry.is_complete(&run), "version {v} is partial");
    }
    assert_eq!(champion(&runs), None);
    assert_eq!(store.offset(&offset_name(MODEL)).unwrap(), None);

    let out = retrain(db, &runs, &cache, &["--method", "none"]);
    assert!(out.contains("PROMOTED"), "{out}");
    let decisions: Vec<String> = store
        .retrains()
        .unwrap()
        .into_iter()
        .map(|r| r.decision)
        .collect();
    assert_eq!(decisions, ["abandoned", "promoted"]);
    assert!(champion(&runs).is_some());
}

/// Two cycles started together: the second waits for the first, then finds nothing new.
/// A corrupt image that arrived is recorded as rejected and the cycle goes on without it.
fn concurrent_cycles_are_serialised(db: &TestDb) {
    let tmp = db.dir.path();
    let days = fashion_days(tmp, 20);
    let (runs, cache) = (tmp.join("runs"), tmp.join("cache"));
    generate(db, &days, "monday", 1.0);
    // A user's folder with one corrupt image among real ones.
    let folder = tmp.join("upload/bag");
    std::fs::create_dir_all(&folder).unwrap();
    let real = std::fs::read_dir(asset("fashion-mnist/test/bag"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .max()
        .unwrap();
    std::fs::copy(&real, folder.join("fine.png")).unwrap();
    std::fs::write(folder.join("broken.png"), b"\x89PNG\r\n\x1a\nnot really").unwrap();
    let ingest = success(&bccp(&[
        "ingest",
        "--db",
        &db.url,
        "--folder",
        tmp.join("upload").to_str().unwrap(),
    ]));
    assert!(ingest.contains("rejected"), "{ingest}");

    let args = retrain_args(db, &runs, &cache, &["--method", "none"]);
    let spawn = || {
        Command::new(env!("CARGO_BIN_EXE_bccp"))
            .arg("--quiet")
            .args(&args)
            .output()
    };
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(spawn);
        let b = s.spawn(spawn);
        (a.join().unwrap().unwrap(), b.join().unwrap().unwrap())
    });
    let outs = [success(&a), success(&b)];
    assert_eq!(
        outs.iter().filter(|o| o.contains("PROMOTED")).count(),
        1,
        "{outs:?}"
    );
    assert_eq!(
        outs.iter().filter(|o| o.contains("no cycle")).count(),
        1,
        "{outs:?}"
    );
    assert_eq!(db.open().retrains().unwrap().len(), 1);
}

/// `bccp up`: both days arrive, a cycle after each, then records stream while scheduled
/// cycles run; bounded by --duration; the closing table lists every cycle.
fn up_runs_the_loop_by_itself(db: &TestDb) {
    let tmp = db.dir.path();
    let days = fashion_days(tmp, 40);
    let weights = asset("weights/mobilenet_v2.safetensors");
    let (runs, cache) = (tmp.join("runs"), tmp.join("cache"));
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_bccp"))
        .args([
            "--quiet",
            "up",
            "--db",
            &db.url,
            "--generate",
            days.to_str().unwrap(),
            "--gate-fraction",
            "0.3",
            "--method",
            "none,bccp",
            "--cutoff-folds",
            "2",
            "--rate",
            "40/s",
            "--every",
            "1s",
            "--duration",
            "8s",
            "--min-new",
            "10",
            "--model",
            MODEL,
            "--image-size",
            "64",
            "--weights",
            weights.to_str().unwrap(),
            "--offline",
            "--device",
            "cpu",
            "--runs-dir",
            runs.to_str().unwrap(),
            "--cache-dir",
            cache.to_str().unwrap(),
            "--serve",
            "127.0.0.1:0",
            "--upload-dir",
            tmp.join("uploads").to_str().unwrap(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    // Standard output line by line; the server's address as soon as it is logged.
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        let mut all = String::new();
        for line in std::io::BufReader::new(stdout).lines() {
            let line = line.unwrap();
            if let Some(addr) = line
                .split("http://")
                .nth(1)
                .and_then(|s| s.split_whitespace().next())
                .and_then(|s| s.parse::<std::net::SocketAddr>().ok())
            {
                let _ = addr_tx.send(addr);
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    // While it re-trains, the server answers: 503 until the first promotion, then predictions
    // with the champion, feedback into the store, the dashboard.
    let addr = addr_rx
        .recv_timeout(Duration::from_secs(60))
        .expect("bccp up logs the server's address");
    let http = |method: &str, path: &str, body: &str| {
        common::http::request(
            addr,
            method,
            path,
            &[("Content-Type", "application/json")],
            body.as_bytes(),
        )
    };
    assert!(
        common::http::eventually(Duration::from_secs(90), || http("GET", "/readyz", "")
            .is_ok_and(|r| r.status == 200)),
        "the champion was never served"
    );
    let image = std::fs::read_dir(days.join("monday"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .min()
        .unwrap();
    let file = std::fs::read_dir(&image)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let rel = file
        .strip_prefix(&days)
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    let answer = http(
        "POST",
        "/predict",
        &format!("{{\"image_path\": \"{rel}\"}}"),
    )
    .unwrap();
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(answer.json()["model"], MODEL);
    let feedback = http(
        "POST",
        "/samples",
        &format!("{{\"image_path\": \"{rel}\", \"label\": 0}}"),
    )
    .unwrap();
    // The image is stored already (generated), so the feedback is a duplicate.
    assert_eq!(
        feedback.json()["status"],
        "duplicate",
        "{}",
        feedback.text()
    );
    assert_eq!(http("GET", "/dashboard", "").unwrap().status, 200);
    let status = child.wait().unwrap();
    let out = reader.join().unwrap();
    assert!(status.success(), "{status:?}\n{out}");
    for line in ["serving loop@champion on http://", "server stopped"] {
        assert!(out.contains(line), "no `{line}` in:\n{out}");
    }
    let logged = db.open().predictions(0, 10).unwrap();
    assert_eq!(logged.len(), 1, "the prediction was logged");
    assert!(started.elapsed() < Duration::from_secs(120));
    for line in [
        "ingested 200 monday samples",
        "retrain started (monday arrived)",
        "ingested 200 tuesday samples",
        "retrain started (tuesday arrived)",
        "streaming at 40 rows/s",
        "retrain started (schedule)",
        "stream ended",
        "| cycle | trigger | candidates |",
    ] {
        assert!(out.contains(line), "no `{line}` in:\n{out}");
    }
    let mut store = db.open();
    let rows = store.retrains().unwrap();
    assert!(rows.len() >= 3, "{out}");
    assert_eq!(rows[0].decision, "promoted");
    assert!(rows.iter().all(|r| r.decision != RUNNING));
    // Every cycle is in the closing table, one line per challenger.
    for r in &rows {
        assert!(
            out.contains(&format!("| {} | {} |", r.id, r.trigger)),
            "{out}"
        );
    }
    let streamed = store
        .count_samples(&bccp::store::SampleFilter::default())
        .unwrap();
    assert!(
        streamed > 400,
        "records streamed after the bulk days: {streamed}"
    );
    assert!(champion(&runs).is_some());
}

on_both_backends!(
    up_runs_the_loop_by_itself,
    gate_rejects_bad_labels_and_promotes_cleansed,
    killed_cycle_leaves_nothing_half_done,
    concurrent_cycles_are_serialised,
);
