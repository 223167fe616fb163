//! `bccp closest` and `bccp sample` on embedding files built here.

mod common;

use std::path::Path;

use bccp::distance::{search_naive, Metric, Precision, Search};
use bccp::embeddings::EmbeddingSet;
use bccp::rng::Rng;
use candle_core::{Device, Tensor};
use common::{bccp, failure, success};

fn write_set(path: &Path, n: usize, dim: usize, classes: i64, seed: u64) -> (Vec<f32>, Vec<i64>) {
    let mut rng = Rng::new(seed);
    let values: Vec<f32> = (0..n * dim).map(|_| rng.unit_f64() as f32 - 0.5).collect();
    let targets: Vec<i64> = (0..n as i64).map(|i| i % classes).collect();
    let set = EmbeddingSet {
        embeddings: Tensor::from_slice(&values, (n, dim), &Device::Cpu).unwrap(),
        targets: targets.clone(),
        ids: None,
        paths: (0..n)
            .map(|i| format!("c{}/{i}.png", i as i64 % classes))
            .collect(),
        classes: (0..classes).map(|c| format!("c{c}")).collect(),
        model: "test".into(),
        weights_sha256: String::new(),
        list_sha256: String::new(),
        shard: None,
    };
    set.save(path).unwrap();
    (values, targets)
}

#[test]
fn closest_matches_the_naive_search() {
    let tmp = tempfile::tempdir().unwrap();
    let (q, c, out) = (
        tmp.path().join("q.safetensors"),
        tmp.path().join("c.safetensors"),
        tmp.path().join("nn.safetensors"),
    );
    let (qv, qt) = write_set(&q, 37, 20, 3, 1);
    let (cv, ct) = write_set(&c, 300, 20, 4, 2);
    for metric in ["l1", "l2", "cosine"] {
        let stdout = success(&bccp(&[
            "closest",
            "--queries",
            q.to_str().unwrap(),
            "--candidates",
            c.to_str().unwrap(),
            "--metric",
            metric,
            "--k",
            "3",
            "--other-class",
            "--out",
            out.to_str().unwrap(),
            "--device",
            "cpu",
        ]));
        assert!(stdout.contains("for 37 queries"), "{stdout}");
        let t = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
        let indices = t["indices"]
            .flatten_all()
            .unwrap()
            .to_vec1::<i64>()
            .unwrap();
        assert_eq!(t["values"].dims(), &[37, 3]);
        let m = <Metric as clap::ValueEnum>::from_str(metric, false).unwrap();
        let want = search_naive(
            &qv,
            &cv,
            20,
            &Search {
                metric: m,
                k: 3,
                other_class: Some((&qt, &ct)),
                precision: Precision::F32,
            },
        );
        assert_eq!(indices, want.indices, "{metric}");
    }
    let err = failure(&bccp(&[
        "closest",
        "--queries",
        q.to_str().unwrap(),
        "--candidates",
        c.to_str().unwrap(),
        "--metric",
        "l3",
        "--out",
        "x",
    ]));
    assert!(err.contains("l3") && err.contains("cosine"), "{err}");
    let other = tmp.path().join("other.safetensors");
    write_set(&other, 10, 7, 2, 3);
    let err = failure(&bccp(&[
        "closest",
        "--queries",
        q.to_str().unwrap(),
        "--candidates",
        other.to_str().unwrap(),
        "--metric",
        "l2",
        "--out",
        out.to_str().unwrap(),
    ]));
    assert!(err.contains("dimension 20") && err.contains("7"), "{err}");
}

fn lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn sample_writes_selections() {
    let tmp = tempfile::tempdir().unwrap();
    let buffer = tmp.path().join("monday.safetensors");
    write_set(&buffer, 200, 8, 4, 7);
    let out = tmp.path().join("sel.jsonl");
    let run = |sampling: &str, ratio: &str, mode: &str| {
        bccp(&[
            "sample",
            "--buffer",
            buffer.to_str().unwrap(),
            "--sampling",
            sampling,
            "--ratio",
            ratio,
            "--mode",
            mode,
            "--seed",
            "5",
            "--out",
            out.to_str().unwrap(),
        ])
    };
    success(&run("random", "0.1", "buffer"));
    let random = lines(&out);
    assert_eq!(random.len(), 20);
    assert!(random[0]["path"].as_str().unwrap().ends_with(".png"));

    success(&run("l2_norm", "0.2", "buffer"));
    let pairs = lines(&out);
    assert_eq!(pairs.len(), 40);
    for p in &pairs {
        let partner = p["partner"].as_u64().unwrap() as usize;
        assert_ne!(p["target"].as_i64().unwrap(), (partner % 4) as i64);
    }

    success(&run("cosine_similarity", "0.2", "faithful"));
    assert_eq!(lines(&out).len(), 40);
    // 50 images per class: the faithful procedure stops after 50 steps (100 images = 0.5).
    let err = failure(&run("l1_norm", "0.6", "faithful"));
    assert!(
        err.contains("ratio too high") && err.contains("--sampling-mode buffer"),
        "{err}"
    );
    success(&run("l1_norm", "0.6", "buffer"));
    assert_eq!(lines(&out).len(), 120);
    let err = failure(&run("nearest", "0.1", "buffer"));
    assert!(err.contains("l2_norm"), "{err}");
}
