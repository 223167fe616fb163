//! Hot reload of `bccp serve` under a bounded concurrent load (real HTTP, a model trained on
//! the real MobileNetV2 weights): promoting v2 while requests run fails none of them and
//! `/model` shows v2 within 3 s, with the backbone kept (only the head changed); promoting a
//! broken v3 leaves v2 serving and counts exactly one failed reload, until a forced reload
//! tries it again; a server started before its model exists serves 503 until it appears.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::http::{copy_version, eventually, get, request, ServeProcess};

const MODEL: &str = "hot";

fn metric(addr: std::net::SocketAddr, line_start: &str) -> f64 {
    get(addr, "/metrics")
        .text()
        .lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

fn alias(runs: &Path, version: u32) {
    common::success(&common::bccp(&[
        "runs",
        "--runs-dir",
        runs.to_str().unwrap(),
        "alias",
        MODEL,
        &version.to_string(),
        "champion",
    ]));
}

fn serve(runs: &Path, cache: &Path, days: &Path, extra: &[&str]) -> ServeProcess {
    let mut args = vec![
        "--model",
        "hot@champion",
        "--runs-dir",
        runs.to_str().unwrap(),
        "--cache-dir",
        cache.to_str().unwrap(),
        "--image-root",
        days.to_str().unwrap(),
        "--no-store",
        "--device",
        "cpu",
        "--poll-ms",
        "200",
    ];
    args.extend_from_slice(extra);
    ServeProcess::start(&args, &[])
}

#[test]
fn promotions_swap_models_under_load_and_a_broken_one_is_not_served() {
    let tmp = tempfile::tempdir().unwrap();
    let days = common::prepared_small(tmp.path());
    let (runs, cache) = (tmp.path().join("runs"), tmp.path().join("cache"));
    common::success(&common::quick_train(&days, &runs, &cache, MODEL, &[]));
    alias(&runs, 1);
    // v2: a second head trained on the same features (another seed).
    common::success(&common::quick_train(
        &days,
        &runs,
        &cache,
        MODEL,
        &["--seed", "7"],
    ));
    let server = serve(&runs, &cache, &days, &[]);
    let addr = server.addr;
    assert_eq!(get(addr, "/model").json()["version"], 1);
    let image: PathBuf = std::fs::read_dir(days.join("monday/class1"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .min()
        .unwrap();
    let bytes = std::fs::read(&image).unwrap();

    // Four clients, each one request at a time, until told to stop.
    let stop = AtomicBool::new(false);
    let (sent, failed) = (AtomicUsize::new(0), AtomicUsize::new(0));
    let seen_v2 = AtomicBool::new(false);
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                while !stop.load(Ordering::SeqCst) {
                    let r = request(
                        addr,
                        "POST",
                        "/predict",
                        &[("Content-Type", "image/png")],
                        &bytes,
                    );
                    sent.fetch_add(1, Ordering::SeqCst);
                    match r {
                        Ok(r) if r.status == 200 => {
                            if r.json()["version"] == 2 {
                                seen_v2.store(true, Ordering::SeqCst);
                            }
                        }
                        other => {
                            eprintln!("failed request: {other:?}");
                            failed.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                }
            });
        }
        std::thread::sleep(Duration::from_millis(300));

        // Promote v2 while requests run.
        let promoted = Instant::now();
        alias(&runs, 2);
        assert!(
            eventually(Duration::from_secs(3), || get(addr, "/model").json()
                ["version"]
                == 2),
            "/model did not show v2 within 3 s"
        );
        eprintln!("v2 served {:?} after the promotion", promoted.elapsed());
        let info = get(addr, "/model").json();
        assert_eq!(info["backbone_reused"], true, "{info}");
        assert_eq!(metric(addr, "bccp_backbone_loads_total"), 1.0);
        assert_eq!(
            metric(addr, "bccp_model_reloads_total{result=\"success\"}"),
            2.0
        );
        assert!(eventually(Duration::from_secs(3), || seen_v2.load(Ordering::SeqCst)));

        // A broken v3: its weights file does not match what was registered.
        copy_version(&runs, MODEL, 2, 3);
        let model = runs.join(MODEL).join("3").join("model.safetensors");
        let mut weights = std::fs::read(&model).unwrap();
        let last = weights.len() - 1;
        weights[last] ^= 0xFF;
        std::fs::write(&model, weights).unwrap();
        alias(&runs, 3);
        assert!(
            eventually(Duration::from_secs(3), || metric(
                addr,
                "bccp_model_reloads_total{result=\"load_failed\"}"
            ) == 1.0),
            "the failed reload was not counted"
        );
        // Several polls later: still v2, and the broken version was not tried again.
        std::thread::sleep(Duration::from_millis(800));
        assert_eq!(get(addr, "/model").json()["version"], 2);
        assert_eq!(get(addr, "/readyz").status, 200);
        assert_eq!(
            metric(addr, "bccp_model_reloads_total{result=\"load_failed\"}"),
            1.0
        );
        stop.store(true, Ordering::SeqCst);
    });
    let (sent, failed) = (sent.into_inner(), failed.into_inner());
    assert_eq!(failed, 0, "{failed} of {sent} requests failed");
    assert!(sent >= 20, "only {sent} requests ran");
    assert_eq!(metric(addr, "bccp_model_version{model=\"hot\"}"), 2.0);

    // A forced reload tries v3 again (loopback, no token configured) and says why it failed.
    let forced = request(addr, "POST", "/admin/reload", &[], b"").unwrap();
    assert_eq!(forced.status, 500, "{}", forced.text());
    let outcome = forced.json();
    assert_eq!(outcome["result"], "failed");
    assert_eq!(outcome["version"], 2);
    assert!(
        outcome["message"].as_str().unwrap().contains("SHA-256"),
        "{outcome}"
    );
    assert_eq!(
        metric(addr, "bccp_model_reloads_total{result=\"load_failed\"}"),
        2.0
    );
    // Moving the alias back to a good version is followed.
    alias(&runs, 1);
    assert!(eventually(Duration::from_secs(3), || get(addr, "/model")
        .json()["version"]
        == 1));
}

#[test]
fn waits_for_a_model_that_does_not_exist_yet() {
    let tmp = tempfile::tempdir().unwrap();
    let days = common::prepared_small(tmp.path());
    let (runs, cache) = (tmp.path().join("runs"), tmp.path().join("cache"));
    let server = serve(&runs, &cache, &days, &["--wait-for-model"]);
    let addr = server.addr;
    assert!(
        server.first_line.contains("no model yet"),
        "{}",
        server.first_line
    );
    assert_eq!(get(addr, "/healthz").status, 200);
    let ready = get(addr, "/readyz");
    assert_eq!(ready.status, 503);
    assert!(
        ready.json()["message"]
            .as_str()
            .unwrap()
            .contains("no alias \"champion\""),
        "{}",
        ready.text()
    );
    let image = std::fs::read(
        days.join("monday/class0")
            .read_dir()
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path(),
    )
    .unwrap();
    let r = request(
        addr,
        "POST",
        "/predict",
        &[("Content-Type", "image/png")],
        &image,
    )
    .unwrap();
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(get(addr, "/model").status, 503);

    common::success(&common::quick_train(&days, &runs, &cache, MODEL, &[]));
    alias(&runs, 1);
    assert!(eventually(Duration::from_secs(3), || get(addr, "/readyz")
        .status
        == 200));
    let r = request(
        addr,
        "POST",
        "/predict",
        &[("Content-Type", "image/png")],
        &image,
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["version"], 1);
    assert_eq!(
        metric(addr, "bccp_model_reloads_total{result=\"load_failed\"}"),
        0.0
    );
}
