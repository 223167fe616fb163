//! The review loop end to end, against SQLite and a throwaway PostgreSQL server, over real
//! HTTP with real Fashion-MNIST images and the real MobileNetV2 weights: a retrain cycle
//! records what it flagged; `bccp serve` lists it on `GET /review` (cards rendered, checked
//! in headless Chromium) and `/review/items`, serves only those images, and stores a
//! person's answer (`POST /review/{id}`) as a verified label (JSON errors: 404, 422, 400; the
//! token rule); the next cycle trains on a verified candidate with its verified label (never
//! cut) and puts the verified sample no model trained on into the gate.

mod common;

use std::collections::HashSet;
use std::path::Path;

use bccp::registry::Registry;
use bccp::store::SampleFilter;
use common::fashion::{self, class_files, fashion_days};
use common::http::{get, post_json, request, ServeProcess};
use common::pg::{Backend, TestDb};
use serde_json::{json, Value};

const MODEL: &str = "loop";

fn generate(db: &TestDb, days: &Path, day: &str, accuracy: f64) {
    fashion::generate(&db.url, days, day, accuracy);
}

fn retrain(db: &TestDb, runs: &Path, cache: &Path, extra: &[&str]) -> String {
    fashion::retrain(&db.url, MODEL, runs, cache, extra)
}

/// The cut-off dropping what it cuts (the default relabels): a cut sample is then one no
/// model trained on.
const BCCP: &[&str] = &[
    "--method",
    "bccp",
    "--cutoff-folds",
    "3",
    "--ratio",
    "0.75",
    "--cutoff-action",
    "drop",
];

fn review_answers_become_trusted_labels(db: &TestDb) {
    let tmp = db.dir.path();
    let days = fashion_days(tmp, 120);
    let (runs, cache) = (tmp.join("runs"), tmp.join("cache"));
    generate(db, &days, "monday", 1.0);
    retrain(db, &runs, &cache, &["--method", "none"]);
    generate(db, &days, "tuesday", 0.7);
    let second = retrain(db, &runs, &cache, BCCP);
    eprintln!("{second}");
    assert!(second.contains("PROMOTED"), "{second}");
    assert!(second.contains("candidates flagged for review"), "{second}");
    let (cycle, flags) = db
        .open()
        .flags(None)
        .unwrap()
        .expect("cycle 2 recorded flags");
    assert_eq!(cycle, 2);
    assert!(flags.len() >= 10, "{} flags", flags.len());
    assert!(flags.windows(2).all(|w| w[0].score >= w[1].score));

    // New images (never stored) for feedback, under the server's image root.
    let extra = tmp.join("extra");
    std::fs::create_dir_all(&extra).unwrap();
    let mut feedback = Vec::new();
    for (class, files) in class_files().iter().enumerate() {
        for f in files.iter().skip(900).take(3) {
            let name = format!("c{class}-{}", f.file_name().unwrap().to_str().unwrap());
            std::fs::copy(f, extra.join(&name)).unwrap();
            feedback.push((name, class));
        }
    }
    let token = "review-token-0123456789";
    let server = ServeProcess::start(
        &[
            "--model",
            &format!("{MODEL}@champion"),
            "--runs-dir",
            runs.to_str().unwrap(),
            "--cache-dir",
            cache.to_str().unwrap(),
            "--db",
            &db.url,
            "--device",
            "cpu",
            "--image-root",
            extra.to_str().unwrap(),
        ],
        &[("BCCP_API_TOKEN", token)],
    );
    let addr = server.addr;
    let auth = format!("Bearer {token}");
    let post = |path: &str, body: &Value, with_token: bool| {
        let mut headers = vec![("Content-Type", "application/json")];
        if with_token {
            headers.push(("Authorization", auth.as_str()));
        }
        request(addr, "POST", path, &headers, body.to_string().as_bytes()).unwrap()
    };

    // The listing: every flag, worst first, paginated.
    let page1 = get(addr, "/review/items?page=1&per_page=5").json();
    assert_eq!(page1["total"], flags.len());
    assert_eq!(page1["origin"], "retrain cycle 2");
    assert_eq!(page1["pages"], flags.len().div_ceil(5));
    let items = page1["items"].as_array().unwrap();
    assert_eq!(items.len(), 5);
    for (item, flag) in items.iter().zip(&flags) {
        assert_eq!(item["id"], flag.sample_id);
        assert!((item["score"].as_f64().unwrap() - flag.score).abs() < 1e-6);
        assert_eq!(item["suggested"]["index"], json!(flag.suggested));
        assert!(item["verified"].is_null());
    }
    let page2 = get(addr, "/review/items?page=2&per_page=5").json();
    assert_eq!(page2["items"][0]["id"], flags[5].sample_id);
    assert_eq!(get(addr, "/review/items?page=0").status, 400);
    assert_eq!(get(addr, "/review/items?per_page=9999").status, 400);

    // The page: one card per flag of the page, with its image.
    let html = get(addr, "/review?per_page=12").text();
    for f in flags.iter().take(12) {
        assert!(html.contains(&format!("id=card-{}", f.sample_id)), "{html}");
    }
    assert!(!html.contains("http://") && !html.contains("https://"));
    if db.backend == Backend::Sqlite {
        // What a person sees: cards with their images drawn (not a blank page). With
        // BCCP_REVIEW_SHOT=FILE the screenshot is kept (docs/review-page.png).
        let shot = tmp.join("review.png");
        let img = common::browser::screenshot(
            &format!("http://{addr}/review?per_page=12"),
            1200,
            900,
            &shot,
        );
        // The card images are Fashion-MNIST: dark backgrounds on light cards.
        let dark = img
            .pixels()
            .filter(|p| p.0[0] < 40 && p.0[1] < 40 && p.0[2] < 40)
            .count();
        let distinct: HashSet<[u8; 3]> = img.pixels().map(|p| [p.0[0], p.0[1], p.0[2]]).collect();
        assert!(
            dark > 112 * 112 * 4,
            "{dark} dark pixels: the images were not drawn"
        );
        assert!(
            distinct.len() > 200,
            "{} colours: a blank page",
            distinct.len()
        );
        if let Some(keep) = std::env::var_os("BCCP_REVIEW_SHOT") {
            std::fs::copy(&shot, keep).unwrap();
        }
    }

    // Images: a flagged sample's bytes; nothing else.
    let x = flags[0].sample_id;
    let stored = {
        let mut s = db.open();
        s.samples(
            &SampleFilter {
                after_id: x - 1,
                up_to_id: Some(x),
                ..SampleFilter::default()
            },
            1,
        )
        .unwrap()
        .remove(0)
    };
    let img = get(addr, &format!("/review/image/{x}"));
    assert_eq!(img.status, 200);
    assert_eq!(img.body, std::fs::read(&stored.image_path).unwrap());
    let flagged: HashSet<i64> = flags.iter().map(|f| f.sample_id).collect();
    let not_flagged = (1..).find(|i| !flagged.contains(i)).unwrap();
    assert_eq!(
        get(addr, &format!("/review/image/{not_flagged}")).status,
        404
    );
    assert_eq!(get(addr, "/review/image/..%2Fetc").status, 404);

    // Answers: the token rule, errors as JSON, then the verified label in the store.
    let classes = db.open().classes().unwrap();
    let truth = stored.label_true.unwrap();
    let r = post(&format!("/review/{x}"), &json!({"label": truth}), false);
    assert_eq!(r.status, 401, "{}", r.text());
    let r = post("/review/99999999", &json!({"label": 0}), true);
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"], "not_found");
    for bad in [json!({"label": 42}), json!({"label": "no-such-class"})] {
        let r = post(&format!("/review/{x}"), &bad, true);
        assert_eq!(r.status, 422, "{}", r.text());
        assert_eq!(r.json()["error"], "invalid_value");
    }
    let r = request(
        addr,
        "POST",
        &format!("/review/{x}"),
        &[("Authorization", auth.as_str())],
        b"not json",
    )
    .unwrap();
    assert_eq!(r.status, 400);
    let r = post(
        &format!("/review/{x}"),
        &json!({"label": classes[truth as usize]}),
        true,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["label"], truth);
    let listed = get(addr, "/review/items?per_page=1").json();
    assert_eq!(listed["items"][0]["verified"]["index"], truth);

    // Feedback for the next cycle, every label wrong; one sample (y) is then verified with
    // its true class through the review endpoint.
    let mut ids = Vec::new();
    for (name, class) in &feedback {
        let r = post_json(
            addr,
            "/samples",
            &json!({"image_path": name, "label": (class + 1) % 10}),
        );
        // /samples is a write too.
        assert_eq!(r.status, 401);
        let r = post(
            "/samples",
            &json!({"image_path": name, "label": (class + 1) % 10}),
            true,
        );
        assert_eq!(r.status, 201, "{}", r.text());
        ids.push((r.json()["id"].as_i64().unwrap(), *class as i64));
    }
    let (y, y_class) = ids[4];
    let r = post(&format!("/review/{y}"), &json!({"label": y_class}), true);
    assert_eq!(r.status, 200, "{}", r.text());
    drop(server);

    // The next cycle: y trains with its verified label and is not flagged; x, which no model
    // trained on (cycle 2 cut it), is in the gate.
    let gate_before = db.open().count_samples(&SampleFilter::gate(None)).unwrap();
    let third = retrain(db, &runs, &cache, BCCP);
    eprintln!("{third}");
    assert!(
        third.contains("verified labels: 1 trained on (never cut), 1 in the gate"),
        "{third}"
    );
    let mut store = db.open();
    let row = store.retrains().unwrap().pop().unwrap();
    assert_eq!(row.reasons["gate_samples"], gate_before + 1);
    assert_eq!(row.reasons["verified_gate"], 1);
    let registry = Registry::open(&runs);
    for c in row.reasons["challengers"].as_array().unwrap() {
        let version = c["version"].as_str().unwrap();
        let record = registry.read(&registry.resolve(version).unwrap()).unwrap();
        let trained: Vec<_> = record
            .split
            .trained_on
            .iter()
            .filter(|t| t.id == y)
            .collect();
        assert_eq!(trained.len(), 1, "{version} did not train on {y}");
        assert_eq!(i64::from(trained[0].label), y_class);
        assert!(record.split.trained_on.iter().all(|t| t.id != x));
    }
    let (cycle, flags3) = store.flags(None).unwrap().unwrap();
    assert_eq!(cycle, row.id);
    assert!(flags3.iter().all(|f| f.sample_id != y));
    // The other feedback labels are all wrong: the cut finds some of them.
    let wrong: HashSet<i64> = ids.iter().map(|(id, _)| *id).filter(|&i| i != y).collect();
    assert!(flags3.iter().any(|f| wrong.contains(&f.sample_id)));
}

on_both_backends!(review_answers_become_trusted_labels);
