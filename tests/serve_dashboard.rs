//! The dashboards: bccp's own `GET /dashboard`, opened in headless Chromium (Debian's
//! `chromium`; the test fails, never skips, without it) with a screenshot checked for drawn
//! charts; and the Grafana provisioning in `deploy/grafana/`, every SQL panel run against a
//! throwaway PostgreSQL server holding bccp's schema and rows in every table, every metric a
//! Prometheus panel names checked against a running server's `/metrics`.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bccp::store::{
    NewPrediction, NewRetrain, NewSample, RetrainOutcome, SampleStatus, Split, Store,
};
use common::http::{copy_version, eventually, get, request, ServeProcess};
use common::pg::{Backend, TestDb};
use serde_json::{json, Value};

fn dashboard_json() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/grafana/dashboards/bccp.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Expands Grafana's PostgreSQL macros the panels use: `$__timeFilter(col)` and
/// `$__timeGroupAlias(col, 'interval')`.
fn expand_macros(sql: &str) -> String {
    let mut out = String::new();
    let mut rest = sql;
    while let Some(start) = rest.find("$__") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 3..];
        let open = after.find('(').expect("a macro call");
        let name = &after[..open];
        // The matching parenthesis.
        let mut depth = 0;
        let mut close = None;
        for (i, ch) in after[open..].char_indices() {
            match ch {
                '(' => depth += 1,
                ')' => {
                    depth -= 1;
                    if depth == 0 {
                        close = Some(open + i);
                        break;
                    }
                }
                _ => {}
            }
        }
        let close = close.expect("a closed macro call");
        let args: Vec<&str> = after[open + 1..close].split(',').map(str::trim).collect();
        let expanded = match name {
            "timeFilter" => format!(
                "{} BETWEEN '2000-01-01T00:00:00Z' AND '2100-01-01T00:00:00Z'",
                args[0]
            ),
            "timeGroupAlias" => {
                assert_eq!(args[1], "'1m'", "{sql}");
                format!(
                    "to_timestamp(floor(extract(epoch from {})/60)*60) AS \"time\"",
                    args[0]
                )
            }
            other => panic!("macro $__{other} is not expanded by this test: {sql}"),
        };
        out.push_str(&expanded);
        rest = &after[close + 1..];
    }
    out.push_str(rest);
    out
}

/// A retrain cycle's reasons as `bccp retrain` writes them (two challengers, one promoted).
fn reasons() -> Value {
    json!({
        "candidates": 120,
        "gate_samples": 40,
        "majority_baseline": 0.34,
        "champion_gate": {"accuracy": 0.61, "per_source": {"monday": [0.7, 20], "tuesday": [0.52, 20]}},
        "challengers": [
            {"version": "served:2", "method": "none", "replayed": 30, "dropped": 0, "trained_on": 150,
             "gate": {"accuracy": 0.58, "per_source": {"monday": [0.55, 20], "tuesday": [0.61, 20]}},
             "promoted": false, "reason": "rejected: monday dropped from 0.7000 to 0.5500 (more than 0.0300)"},
            {"version": "served:3", "method": "bccp", "replayed": 30, "dropped": 45, "relabelled": 15, "trained_on": 105,
             "gate": {"accuracy": 0.74, "per_source": {"monday": [0.78, 20], "tuesday": [0.70, 20]}},
             "promoted": true, "reason": null},
        ],
    })
}

/// Rows in every table the panels read.
fn fill(store: &mut dyn Store, predictions: usize) {
    store
        .ensure_classes(&["class0".into(), "class1".into(), "class2".into()])
        .unwrap();
    store
        .insert_samples(&[NewSample {
            key: "content:abc".into(),
            timestamp: bccp::store::now_utc(),
            image_path: "/tmp/a.png".into(),
            sha256: Some("abc".into()),
            label_given: 1,
            label_true: None,
            source: "feedback".into(),
            split: Split::Train,
            status: SampleStatus::Accepted,
        }])
        .unwrap();
    let rows: Vec<NewPrediction> = (0..predictions)
        .map(|i| NewPrediction {
            timestamp: bccp::store::now_utc(),
            sample_id: None,
            request_id: Some(format!("r{i}")),
            model: "served".into(),
            version: 1 + (i % 2) as i64,
            class: (i % 3) as i64,
            probability: 0.8,
            latency_ms: 3.0 + i as f64,
        })
        .collect();
    store.insert_predictions(&rows).unwrap();
    let id = store
        .start_retrain(&NewRetrain {
            started: bccp::store::now_utc(),
            trigger: "tuesday arrived".into(),
            champion: Some("served:1".into()),
        })
        .unwrap();
    store
        .finish_retrain(
            id,
            &RetrainOutcome {
                finished: bccp::store::now_utc(),
                challenger: Some("served:3".into()),
                champion: Some("served:3".into()),
                decision: "promoted".into(),
                reasons: reasons(),
                watermark: Some(1),
            },
            &[],
        )
        .unwrap();
}

#[test]
fn every_grafana_sql_panel_runs_on_postgres() {
    let db = TestDb::new(Backend::Postgres);
    fill(db.open().as_mut(), 12);
    let mut client = db.server.as_ref().unwrap().client("bccp_test");
    let dashboard = dashboard_json();
    let panels = dashboard["panels"].as_array().unwrap();
    let datasources = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("deploy/grafana/provisioning/datasources/bccp.yaml"),
    )
    .unwrap();
    let mut ran = 0;
    for panel in panels {
        let uid = panel["datasource"]["uid"].as_str().unwrap();
        assert!(
            datasources.contains(&format!("uid: {uid}")),
            "panel {} uses an unprovisioned data source {uid}",
            panel["title"]
        );
        for target in panel["targets"].as_array().unwrap() {
            let Some(sql) = target["rawSql"].as_str() else {
                continue;
            };
            let expanded = expand_macros(sql);
            let rows = client
                .query(expanded.as_str(), &[])
                .unwrap_or_else(|e| panic!("panel {}: {e}\n{expanded}", panel["title"]));
            assert!(
                !rows.is_empty(),
                "panel {} returned no rows:\n{expanded}",
                panel["title"]
            );
            ran += 1;
        }
    }
    assert!(ran >= 7, "{ran} SQL panels");
    // The per-day gate panel reads the JSON bccp retrain writes: two challengers × two days.
    let gate = panels
        .iter()
        .find(|p| {
            p["title"]
                .as_str()
                .unwrap()
                .contains("gate accuracy per day")
        })
        .unwrap();
    let rows = client
        .query(
            expand_macros(gate["targets"][0]["rawSql"].as_str().unwrap()).as_str(),
            &[],
        )
        .unwrap();
    assert_eq!(rows.len(), 4);
    let promoted: Vec<(String, String, f64, f64)> = rows
        .iter()
        .map(|r| {
            (
                r.get("challenger"),
                r.get("decision"),
                r.get("gate_accuracy"),
                r.get::<_, Option<f64>>("cut_share").unwrap(),
            )
        })
        .filter(|(c, ..)| c == "served:3")
        .collect();
    assert_eq!(promoted.len(), 2);
    assert!(promoted
        .iter()
        .all(|(_, d, _, share)| d == "promoted" && (share - 0.4).abs() < 1e-9));
}

/// Debian's Chromium, or the `chromium` on the PATH.
/// Pixels within a small distance of `rgb`.
fn count_colour(img: &image::RgbaImage, rgb: [u8; 3]) -> usize {
    img.pixels()
        .filter(|p| (0..3).all(|c| (i32::from(p.0[c]) - i32::from(rgb[c])).abs() <= 12))
        .count()
}

#[test]
fn dashboard_draws_charts_in_headless_chromium() {
    let tmp = tempfile::tempdir().unwrap();
    let days = common::prepared_small(tmp.path());
    let (runs, cache) = (tmp.path().join("runs"), tmp.path().join("cache"));
    common::success(&common::quick_train(&days, &runs, &cache, "served", &[]));
    copy_version(&runs, "served", 1, 2);
    common::success(&common::bccp(&[
        "runs",
        "--runs-dir",
        runs.to_str().unwrap(),
        "alias",
        "served",
        "1",
        "champion",
    ]));
    let db = format!("sqlite:{}", tmp.path().join("store.sqlite3").display());
    let server = ServeProcess::start(
        &[
            "--model",
            "served@champion",
            "--runs-dir",
            runs.to_str().unwrap(),
            "--cache-dir",
            cache.to_str().unwrap(),
            "--db",
            &db,
            "--device",
            "cpu",
            "--poll-ms",
            "100",
        ],
        &[],
    );
    let addr = server.addr;
    // Predictions over a few seconds (several time buckets, every class image), v2 promoted
    // half-way, and one retrain cycle recorded.
    let images: Vec<Vec<u8>> = (0..3)
        .map(|c| {
            let dir = days.join(format!("monday/class{c}"));
            let first = std::fs::read_dir(dir)
                .unwrap()
                .map(|e| e.unwrap().path())
                .min()
                .unwrap();
            std::fs::read(first).unwrap()
        })
        .collect();
    for round in 0..4 {
        if round == 2 {
            common::success(&common::bccp(&[
                "runs",
                "--runs-dir",
                runs.to_str().unwrap(),
                "alias",
                "served",
                "2",
                "champion",
            ]));
            assert!(eventually(Duration::from_secs(3), || get(addr, "/model")
                .json()["version"]
                == 2));
        }
        for k in 0..15 {
            let r = request(
                addr,
                "POST",
                "/predict",
                &[("Content-Type", "image/png")],
                &images[k % 3],
            )
            .unwrap();
            assert_eq!(r.status, 200, "{}", r.text());
        }
        std::thread::sleep(Duration::from_millis(1000));
    }
    {
        let mut store = common::pg::open(&db);
        let id = store
            .start_retrain(&NewRetrain {
                started: bccp::store::now_utc(),
                trigger: "tuesday arrived".into(),
                champion: Some("served:1".into()),
            })
            .unwrap();
        store
            .finish_retrain(
                id,
                &RetrainOutcome {
                    finished: bccp::store::now_utc(),
                    challenger: Some("served:3".into()),
                    champion: Some("served:3".into()),
                    decision: "promoted".into(),
                    reasons: reasons(),
                    watermark: None,
                },
                &[],
            )
            .unwrap();
    }
    assert!(eventually(Duration::from_secs(5), || {
        common::pg::open(&db).predictions(0, 100).unwrap().len() == 60
    }));

    let page = get(addr, "/dashboard?refresh=3600");
    assert_eq!(page.status, 200);
    assert!(page
        .header("content-type")
        .unwrap()
        .starts_with("text/html"));
    let html = page.text();
    assert!(html.contains("<meta http-equiv=\"refresh\" content=\"3600\">"));
    assert!(
        get(addr, "/dashboard").text().contains("content=\"5\""),
        "refreshes itself by default"
    );
    for id in [
        "id=\"rate\"",
        "id=\"latency\"",
        "id=\"version\"",
        "id=\"gate\"",
    ] {
        assert!(html.contains(id), "{id} missing");
    }
    assert!(
        html.contains("rejected: monday dropped") && html.contains("40.0%"),
        "the cycle table"
    );
    // No external requests: no script, stylesheet, image or link to fetch.
    for needle in ["<script", "src=", "href=", "url(", "@import"] {
        assert!(!html.contains(needle), "the page has {needle}");
    }
    let without_namespace = html.replace("http://www.w3.org/2000/svg", "");
    assert!(
        !without_namespace.contains("http://") && !without_namespace.contains("https://"),
        "a URL in the page"
    );

    // Every metric a Prometheus panel of the Grafana dashboard names is exposed.
    let exposition = get(addr, "/metrics").text();
    let exposed: BTreeSet<&str> = exposition
        .lines()
        .filter_map(|l| match l.strip_prefix("# TYPE ") {
            Some(t) => t.split(' ').next(),
            None if l.starts_with('#') => None,
            None => l.split(['{', ' ']).next(),
        })
        .collect();
    assert!(exposed.contains("bccp_predict_duration_seconds_bucket"));
    for panel in dashboard_json()["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let Some(expr) = target["expr"].as_str() else {
                continue;
            };
            for name in expr
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| w.starts_with("bccp_"))
            {
                assert!(
                    exposed.contains(name),
                    "panel {}: {name} is not exposed",
                    panel["title"]
                );
            }
        }
    }

    // Headless Chromium takes a screenshot; the charts' colours must be on it.
    let shot = tmp.path().join("dashboard.png");
    let img = common::browser::screenshot(
        &format!("http://{addr}/dashboard?refresh=3600"),
        1280,
        1500,
        &shot,
    );
    let keep = std::env::var_os("BCCP_KEEP_SCREENSHOT").map(PathBuf::from);
    if let Some(k) = &keep {
        std::fs::copy(&shot, k).unwrap();
    }
    let white = img.pixels().filter(|p| p.0[..3] == [255, 255, 255]).count();
    assert!(white < img.pixels().count(), "a blank page");
    // The first class's bars, the p50 line and Monday's gate bars.
    let blue = count_colour(&img, [0x1f, 0x77, 0xb4]);
    // Tuesday's gate bars (and a second class's bars, if predicted).
    let orange = count_colour(&img, [0xff, 0x7f, 0x0e]);
    // The version line (and a third class's bars, if predicted).
    let green = count_colour(&img, [0x2c, 0xa0, 0x2c]);
    // The p95 line.
    let red = count_colour(&img, [0xd6, 0x27, 0x28]);
    eprintln!("chart pixels: blue {blue}, orange {orange}, green {green}, red {red}");
    assert!(
        blue > 2000 && orange > 1000 && green > 400 && red > 100,
        "charts not drawn: blue {blue}, orange {orange}, green {green}, red {red}"
    );
}
