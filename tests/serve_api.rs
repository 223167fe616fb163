//! `bccp serve` over real HTTP on 127.0.0.1 (a free port), with a model trained here on the
//! real MobileNetV2 weights: every form of `POST /predict`, every bad input answered with its
//! status (path traversal, missing file, zero-byte, truncated, text sent as image/png, a 50 MB
//! body, a decompression bomb, malformed JSON, too many images), feedback into the store,
//! token checks (401 and nothing stored), a slow client while others are served, 200
//! concurrent connections batched together, and predictions logged.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::http::{self, get, multipart, post_json, request, ServeProcess};
use serde_json::json;

const MODEL: &str = "served";

/// A prepared dataset (3 classes) and a model trained on it, registered as `served:1` with
/// the alias `champion`; built once per test binary.
struct Fixture {
    days: PathBuf,
    runs: PathBuf,
    cache: PathBuf,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("serve_api");
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        let days = common::prepared_small(&root);
        let (runs, cache) = (root.join("runs"), root.join("cache"));
        common::success(&common::quick_train(&days, &runs, &cache, MODEL, &[]));
        common::success(&common::bccp(&[
            "runs",
            "--runs-dir",
            runs.to_str().unwrap(),
            "alias",
            MODEL,
            "1",
            "champion",
        ]));
        Fixture { days, runs, cache }
    })
}

/// Starts a server on the fixture's model with a store at `db` and extra flags.
fn serve(db: &Path, extra: &[&str], env: &[(&str, &str)]) -> ServeProcess {
    let f = fixture();
    let db = format!("sqlite:{}", db.display());
    let mut args = vec![
        "--model",
        "served@champion",
        "--runs-dir",
        f.runs.to_str().unwrap(),
        "--cache-dir",
        f.cache.to_str().unwrap(),
        "--image-root",
        f.days.to_str().unwrap(),
        "--db",
        &db,
        "--device",
        "cpu",
    ];
    args.extend_from_slice(extra);
    ServeProcess::start(&args, env)
}

/// A Monday image of the fixture, relative to the image root.
fn monday_image(k: usize) -> String {
    let dir = fixture().days.join("monday/class0");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    format!("monday/class0/{}", names[k % names.len()])
}

fn raw(addr: std::net::SocketAddr, content_type: &str, body: &[u8]) -> http::Reply {
    request(
        addr,
        "POST",
        "/predict",
        &[("Content-Type", content_type)],
        body,
    )
    .unwrap()
}

fn assert_error(reply: &http::Reply, status: u16, needle: &str) {
    assert_eq!(reply.status, status, "{}", reply.text());
    let body = reply.json();
    assert_eq!(body["status"], status, "{body}");
    let message = body["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(needle),
        "{status}: {message:?} lacks {needle:?}"
    );
}

fn metric(addr: std::net::SocketAddr, line_start: &str) -> f64 {
    get(addr, "/metrics")
        .text()
        .lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn predict_forms_and_every_bad_input() {
    let f = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let server = serve(
        &tmp.path().join("store.sqlite3"),
        &["--max-request-images", "8"],
        &[],
    );
    let addr = server.addr;
    assert!(
        server.first_line.contains("serving served:1"),
        "{}",
        server.first_line
    );
    assert_eq!(get(addr, "/healthz").status, 200);
    assert_eq!(get(addr, "/readyz").json()["ready"], true);
    let info = get(addr, "/model").json();
    assert_eq!(info["name"], MODEL);
    assert_eq!(info["version"], 1);
    assert_eq!(info["alias"], "champion");
    assert_eq!(info["backbone"], "mobilenet_v2");
    assert_eq!(info["classes"], json!(["class0", "class1", "class2"]));

    // The reference's request, and the same image as raw bytes and as an upload.
    let rel = monday_image(0);
    let by_path = post_json(addr, "/predict", &json!({"image_path": rel}));
    assert_eq!(by_path.status, 200, "{}", by_path.text());
    let a = by_path.json();
    let target = a["target"].as_u64().unwrap();
    assert!(target < 3);
    assert_eq!(a["class"], format!("class{target}"));
    assert_eq!(a["model"], MODEL);
    assert_eq!(a["version"], 1);
    let top: Vec<f64> = a["top_k"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["probability"].as_f64().unwrap())
        .collect();
    assert_eq!(top.len(), 3, "top_k lists every class of a 3-class model");
    assert!(top.windows(2).all(|w| w[0] >= w[1]), "{top:?}");
    assert!((top.iter().sum::<f64>() - 1.0).abs() < 1e-4);
    assert!((a["probability"].as_f64().unwrap() - top[0]).abs() < 1e-6);
    let bytes = std::fs::read(f.days.join(&rel)).unwrap();
    let b = raw(addr, "image/png", &bytes).json();
    assert_eq!(b["target"], a["target"]);
    assert!((b["probability"].as_f64().unwrap() - top[0]).abs() < 1e-5);
    let (ct, body) = multipart(&[("image", "a.png", &bytes)], &[]);
    let c = raw(addr, &ct, &body);
    assert_eq!(c.status, 200, "{}", c.text());
    assert_eq!(c.json()["target"], a["target"]);
    let other = std::fs::read(f.days.join(monday_image(1))).unwrap();
    let (ct, body) = multipart(
        &[("image", "a.png", &bytes), ("image", "b.png", &other)],
        &[],
    );
    let both = raw(addr, &ct, &body).json();
    assert_eq!(both["results"].as_array().unwrap().len(), 2, "{both}");
    assert_eq!(both["results"][0]["target"], a["target"]);

    // Bad files under the image root.
    let bad = f.days.join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::write(bad.join("empty.png"), b"").unwrap();
    std::fs::write(bad.join("cut.png"), &bytes[..bytes.len() / 2]).unwrap();
    std::fs::write(bad.join("text.png"), b"hello, I am not a PNG\n").unwrap();
    std::fs::write(tmp.path().join("secret.png"), &bytes).unwrap();
    let link = bad.join("escape.png");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(tmp.path().join("secret.png"), &link).unwrap();

    // One JSON batch with one good image among bad ones: each has its own answer.
    let batch = post_json(
        addr,
        "/predict",
        &json!({"batch": [
            {"image_path": rel},
            {"image_path": "../secret.png"},
            {"image_path": "monday/none.png"},
            {"image_path": "bad/empty.png"},
            {"image_path": "bad/cut.png"},
            {"image_path": "bad/text.png"},
            {"image_path": "bad/escape.png"},
            {"path": "typo"},
        ]}),
    );
    assert_eq!(batch.status, 200, "{}", batch.text());
    let results = batch.json()["results"].as_array().unwrap().clone();
    let statuses: Vec<u64> = results
        .iter()
        .map(|r| r["status"].as_u64().unwrap_or(200))
        .collect();
    assert_eq!(
        statuses,
        [200, 400, 404, 415, 415, 415, 400, 400],
        "{results:?}"
    );
    assert_eq!(
        results[0]["target"], a["target"],
        "the good image is answered"
    );

    // The same, one request each.
    let single = |p: &str| post_json(addr, "/predict", &json!({"image_path": p}));
    assert_error(&single("../secret.png"), 400, "without '..'");
    assert_error(&single("monday/../../secret.png"), 400, "without '..'");
    assert_error(&single("/etc/passwd"), 400, "relative");
    assert_error(&single("bad/escape.png"), 400, "outside the image root");
    assert_error(&single("monday/none.png"), 404, "no image");
    assert_error(&single("bad/empty.png"), 415, "empty");
    assert_error(&single("bad/cut.png"), 415, "truncated");
    assert_error(&single("bad/text.png"), 415, "not an image");
    assert_error(&single("bad"), 400, "not a regular file");
    assert_error(&raw(addr, "image/png", b""), 415, "empty");
    assert_error(
        &raw(addr, "image/png", &bytes[..bytes.len() - 10]),
        415,
        "truncated",
    );
    assert_error(
        &raw(addr, "image/png", b"plain text, sent as image/png"),
        415,
        "not an image",
    );
    assert_error(&raw(addr, "text/plain", b"hello"), 415, "content type");
    assert_error(
        &raw(addr, "application/json", b"{\"image_path\": "),
        400,
        "malformed JSON",
    );
    assert_error(&raw(addr, "application/json", b"[1, 2]"), 400, "expected");
    assert_error(
        &post_json(addr, "/predict", &json!({"image_path": 7})),
        400,
        "string",
    );
    // A PNG of a few bytes that declares 16000×14464 pixels.
    assert_error(
        &raw(addr, "image/png", &bomb_png()),
        413,
        "decompression bomb",
    );
    // Over --max-request-images.
    let many: Vec<_> = (0..9).map(|_| json!({"image_path": rel})).collect();
    assert_error(
        &post_json(addr, "/predict", &json!({"batch": many})),
        413,
        "--max-request-images",
    );
    // 50 MB: refused from its Content-Length.
    let started = Instant::now();
    let big = vec![0u8; 50 << 20];
    assert_error(&raw(addr, "image/png", &big), 413, "over the limit");
    assert!(started.elapsed() < Duration::from_secs(20));
    // Unknown endpoint.
    assert_eq!(get(addr, "/nothing").status, 404);

    // Still healthy, and no request failed on the server's side.
    assert_eq!(raw(addr, "image/png", &bytes).status, 200);
    assert_eq!(
        metric(
            addr,
            "bccp_http_requests_total{endpoint=\"/predict\",status=\"5"
        ),
        0.0
    );
    assert!(!get(addr, "/metrics").text().contains("status=\"500\""));
}

/// A valid 1×1 PNG whose header claims 16000×14464 pixels (CRC fixed up).
fn bomb_png() -> Vec<u8> {
    let mut png = Vec::new();
    image::GrayImage::from_pixel(1, 1, image::Luma([0]))
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    png[16..20].copy_from_slice(&16000u32.to_be_bytes());
    png[20..24].copy_from_slice(&14464u32.to_be_bytes());
    let mut crc = flate2::Crc::new();
    crc.update(&png[12..29]);
    png[29..33].copy_from_slice(&crc.sum().to_be_bytes());
    png
}

#[test]
fn feedback_needs_the_token_and_lands_in_the_store() {
    let f = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let token = "s3cret-token-for-the-tests-0123";
    let token_file = tmp.path().join("token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    let db = tmp.path().join("store.sqlite3");
    let uploads = tmp.path().join("uploads");
    let server = serve(
        &db,
        &[
            "--token-file",
            token_file.to_str().unwrap(),
            "--upload-dir",
            uploads.to_str().unwrap(),
        ],
        &[],
    );
    let addr = server.addr;
    let count = || {
        common::pg::open(&format!("sqlite:{}", db.display()))
            .count_samples(&bccp::store::SampleFilter::default())
            .unwrap()
    };
    let rel = monday_image(2);
    let body = serde_json::to_vec(&json!({"image_path": rel, "label": 1})).unwrap();
    let send = |auth: Option<&str>, body: &[u8], ct: &str, path: &str| {
        let bearer = auth.map(|t| format!("Bearer {t}"));
        let mut headers = vec![("Content-Type", ct)];
        if let Some(b) = &bearer {
            headers.push(("Authorization", b.as_str()));
        }
        request(addr, "POST", path, &headers, body).unwrap()
    };
    // No token, a wrong one, a near miss: 401 and nothing stored.
    assert_error(
        &send(None, &body, "application/json", "/samples"),
        401,
        "Bearer",
    );
    assert_error(
        &send(Some("wrong"), &body, "application/json", "/samples"),
        401,
        "wrong",
    );
    assert_error(
        &send(
            Some(&token[..token.len() - 1]),
            &body,
            "application/json",
            "/samples",
        ),
        401,
        "wrong",
    );
    assert_error(
        &send(None, b"", "application/json", "/admin/reload"),
        401,
        "Bearer",
    );
    assert_eq!(count(), 0);
    // Reads need no token.
    assert_eq!(get(addr, "/model").status, 200);

    // Labels out of range or unknown: 422, nothing stored.
    let label =
        |l: serde_json::Value| serde_json::to_vec(&json!({"image_path": rel, "label": l})).unwrap();
    assert_error(
        &send(
            Some(token),
            &label(json!(3)),
            "application/json",
            "/samples",
        ),
        422,
        "out of range",
    );
    assert_error(
        &send(
            Some(token),
            &label(json!(-1)),
            "application/json",
            "/samples",
        ),
        422,
        "out of range",
    );
    assert_error(
        &send(
            Some(token),
            &label(json!("cat")),
            "application/json",
            "/samples",
        ),
        422,
        "not a class",
    );
    assert_error(
        &send(
            Some(token),
            &label(json!(1.5)),
            "application/json",
            "/samples",
        ),
        422,
        "whole",
    );
    assert_error(
        &send(
            Some(token),
            b"{\"image_path\": 1",
            "application/json",
            "/samples",
        ),
        400,
        "malformed",
    );
    assert_eq!(count(), 0);

    // A good one, then the same content again.
    let ok = send(Some(token), &body, "application/json", "/samples");
    assert_eq!(ok.status, 201, "{}", ok.text());
    let ok = ok.json();
    assert_eq!(ok["status"], "accepted");
    assert_eq!(ok["class"], "class1");
    let dup = send(
        Some(token),
        &label(json!("class2")),
        "application/json",
        "/samples",
    );
    assert_eq!(dup.status, 200);
    assert_eq!(dup.json()["status"], "duplicate");
    // An upload (multipart), and raw bytes with ?label=.
    let bytes = std::fs::read(f.days.join(monday_image(3))).unwrap();
    let (ct, mp) = multipart(&[("image", "mine.png", &bytes)], &[("label", "class2")]);
    let up = send(Some(token), &mp, &ct, "/samples");
    assert_eq!(up.status, 201, "{}", up.text());
    let other = std::fs::read(f.days.join(monday_image(4))).unwrap();
    let rawup = send(Some(token), &other, "image/png", "/samples?label=0");
    assert_eq!(rawup.status, 201, "{}", rawup.text());
    let text = send(
        Some(token),
        b"not an image",
        "image/png",
        "/samples?label=0",
    );
    assert_error(&text, 415, "not an image");
    assert_eq!(count(), 3);

    let mut store = common::pg::open(&format!("sqlite:{}", db.display()));
    let classes = store.classes().unwrap();
    assert_eq!(
        classes,
        ["class0", "class1", "class2"],
        "the model's indexes"
    );
    let rows = store
        .samples(&bccp::store::SampleFilter::default(), 10)
        .unwrap();
    assert_eq!(rows.len(), 3);
    assert!(rows.iter().all(|r| r.source == "feedback"
        && r.split == bccp::store::Split::Train
        && r.status == bccp::store::SampleStatus::Accepted));
    assert_eq!(
        rows.iter().map(|r| r.label_given).collect::<Vec<_>>(),
        [1, 2, 0]
    );
    assert_eq!(
        PathBuf::from(&rows[0].image_path),
        f.days.join(&rel).canonicalize().unwrap()
    );
    let kept = PathBuf::from(&rows[1].image_path);
    assert!(kept.starts_with(&uploads), "{}", kept.display());
    assert_eq!(std::fs::read(&kept).unwrap(), bytes);
    // The candidates of the next retrain cycle.
    assert_eq!(
        store
            .count_samples(&bccp::store::SampleFilter::since(0))
            .unwrap(),
        3
    );
    let reload = send(Some(token), b"", "application/json", "/admin/reload");
    assert_eq!(reload.status, 200, "{}", reload.text());
    assert_eq!(reload.json()["result"], "unchanged");
    assert_eq!(
        metric(addr, "bccp_samples_ingested_total{result=\"accepted\"}"),
        3.0
    );
    assert_eq!(metric(addr, "bccp_auth_failures_total"), 4.0);
}

#[test]
fn refuses_a_public_address_without_a_token() {
    let f = fixture();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_bccp"))
        .args([
            "serve",
            "--model",
            "served@champion",
            "--runs-dir",
            f.runs.to_str().unwrap(),
            "--bind",
            "0.0.0.0:0",
            "--no-store",
        ])
        .env_remove("BCCP_API_TOKEN")
        .output()
        .unwrap();
    let err = common::failure(&out);
    assert!(
        err.contains("not a loopback address") && err.contains("--token-file"),
        "{err}"
    );
    // A token too short to be a secret is refused too.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_bccp"))
        .args([
            "serve",
            "--model",
            "served@champion",
            "--bind",
            "0.0.0.0:0",
            "--no-store",
        ])
        .env("BCCP_API_TOKEN", "short")
        .output()
        .unwrap();
    let err = common::failure(&out);
    assert!(err.contains("at least 16"), "{err}");
}

#[test]
fn slow_clients_and_200_connections_and_the_log() {
    let f = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("store.sqlite3");
    let server = serve(&db, &["--max-wait-ms", "5"], &[]);
    let addr = server.addr;
    let bytes = std::fs::read(f.days.join(monday_image(5))).unwrap();

    // A client that sends its headers and part of its body, then stalls; another that
    // trickles its headers byte by byte.
    let mut stalled = TcpStream::connect(addr).unwrap();
    stalled
        .write_all(
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nContent-Length: 100000\r\n\r\n\x89PNG",
        )
        .unwrap();
    let mut trickle = TcpStream::connect(addr).unwrap();
    trickle.write_all(b"POST /pred").unwrap();
    let started = Instant::now();
    for _ in 0..10 {
        assert_eq!(raw(addr, "image/png", &bytes).status, 200);
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "others are served while slow clients hold connections ({:?})",
        started.elapsed()
    );
    drop(trickle);

    // 200 connections at once, each one image, tagged with a request id.
    let ok: Vec<(u16, String)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..200)
            .map(|i| {
                let bytes = &bytes;
                s.spawn(move || {
                    let id = format!("load-{i}");
                    let r = request(
                        addr,
                        "POST",
                        "/predict",
                        &[("Content-Type", "image/png"), ("X-Request-Id", &id)],
                        bytes,
                    )
                    .unwrap();
                    (
                        r.status,
                        r.json()["request_id"].as_str().unwrap_or("").to_owned(),
                    )
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(
        ok.iter().all(|(s, _)| *s == 200),
        "{:?}",
        ok.iter().filter(|(s, _)| *s != 200).collect::<Vec<_>>()
    );
    assert!(ok
        .iter()
        .enumerate()
        .all(|(i, (_, id))| *id == format!("load-{i}")));
    // They were batched: fewer backbone batches than images.
    let batches = metric(addr, "bccp_batch_size_count");
    let images = metric(addr, "bccp_batch_size_sum");
    assert_eq!(images, 210.0);
    assert!(batches < 150.0, "{batches} batches for 210 images");
    drop(stalled);

    // A clean stop flushes the prediction log: every answered image is in the store.
    let status = server.stop(Duration::from_secs(15));
    assert!(status.success(), "{status:?}");
    let mut store = common::pg::open(&format!("sqlite:{}", db.display()));
    let rows = store.predictions(0, 1000).unwrap();
    assert_eq!(rows.len(), 210);
    assert!(rows
        .iter()
        .all(|r| r.prediction.model == MODEL && r.prediction.version == 1));
    assert!(rows.iter().all(|r| (0..3).contains(&r.prediction.class)));
    assert!(rows.iter().all(|r| r.prediction.latency_ms > 0.0));
    let tagged = rows
        .iter()
        .filter(|r| {
            r.prediction
                .request_id
                .as_deref()
                .is_some_and(|id| id.starts_with("load-"))
        })
        .count();
    assert_eq!(tagged, 200);
}

/// Every class's probability in an answer, by class index.
fn probabilities(answer: &serde_json::Value) -> Vec<f64> {
    let mut p = vec![0.0; 3];
    for c in answer["top_k"].as_array().unwrap() {
        let class = c["class"].as_str().unwrap();
        let k: usize = class.trim_start_matches("class").parse().unwrap();
        p[k] = c["probability"].as_f64().unwrap();
    }
    p
}

#[test]
fn bf16_products_serve_and_predict_like_f32() {
    let f = fixture();
    let runs = f.runs.to_str().unwrap();
    let cache = f.cache.to_str().unwrap();
    let images: Vec<PathBuf> = (0..6).map(|k| f.days.join(monday_image(k))).collect();
    let predict = |precision: &str| {
        let mut args = vec![
            "predict",
            "--model",
            "served@champion",
            "--runs-dir",
            runs,
            "--cache-dir",
            cache,
            "--precision",
            precision,
        ];
        args.extend(images.iter().map(|p| p.to_str().unwrap()));
        common::bccp(&args)
    };
    if !bccp::ops::bf16_gemm::available() {
        let err = common::failure(&predict("bf16"));
        assert!(
            err.contains("--precision bf16") && err.contains("AVX512-BF16"),
            "{err}"
        );
        let out = common::bccp(&[
            "serve",
            "--model",
            "served@champion",
            "--runs-dir",
            runs,
            "--no-store",
            "--bind",
            "127.0.0.1:0",
            "--precision",
            "bf16",
        ]);
        let err = common::failure(&out);
        assert!(
            err.contains("--precision") && err.contains("AVX512-BF16"),
            "{err}"
        );
        return;
    }

    // `bccp predict`: the same classes, confidences within bf16 rounding of f32's.
    let lines = |out: &str| -> Vec<(String, f64)> {
        out.lines()
            .map(|l| {
                let cols: Vec<&str> = l.split('\t').collect();
                (cols[1].to_owned(), cols[2].parse().unwrap())
            })
            .collect()
    };
    let (full, half) = (
        lines(&common::success(&predict("f32"))),
        lines(&common::success(&predict("bf16"))),
    );
    assert_eq!(full.len(), images.len());
    for ((c32, p32), (c16, p16)) in full.iter().zip(&half) {
        if (p32 - p16).abs() > 0.05 || (c32 != c16 && *p32 > 0.6) {
            panic!("predict f32 {c32} {p32} against bf16 {c16} {p16}");
        }
    }

    // `bccp serve --precision bf16`: /model says so; answers within rounding of f32's, and
    // not the f32 bits (the bf16 products ran).
    let tmp = tempfile::tempdir().unwrap();
    let a = serve(&tmp.path().join("a.sqlite3"), &[], &[]);
    let b = serve(&tmp.path().join("b.sqlite3"), &["--precision", "bf16"], &[]);
    assert!(b.first_line.contains("bf16 products"), "{}", b.first_line);
    assert_eq!(get(a.addr, "/model").json()["precision"], "f32");
    assert_eq!(get(b.addr, "/model").json()["precision"], "bf16");
    let mut largest: f64 = 0.0;
    for k in 0..images.len() {
        let body = json!({"image_path": monday_image(k)});
        let (r32, r16) = (
            post_json(a.addr, "/predict", &body),
            post_json(b.addr, "/predict", &body),
        );
        assert_eq!((r32.status, r16.status), (200, 200), "{}", r16.text());
        let (p32, p16) = (probabilities(&r32.json()), probabilities(&r16.json()));
        assert!((p16.iter().sum::<f64>() - 1.0).abs() < 1e-4, "{p16:?}");
        for (x, y) in p32.iter().zip(&p16) {
            largest = largest.max((x - y).abs());
        }
    }
    eprintln!("bf16 serving: largest probability difference {largest:.4}");
    assert!(largest > 0.0 && largest < 0.05, "{largest}");
    a.stop(Duration::from_secs(20));
    b.stop(Duration::from_secs(20));
}
