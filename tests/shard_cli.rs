//! Sharded search (issue 18): merged partial results equal the unsharded search bit for bit
//! (N = 1, 3, 7 shards, every metric, with and without the other-class rule, ties across shard
//! borders, shards smaller than k), merges do not depend on the order of the parts, bad sets of
//! parts are refused by name, and `embed --shard` → `closest` → `merge-topk` end to end.

mod common;

use std::path::{Path, PathBuf};

use bccp::distance::{search_host, Metric, Precision, Search};
use bccp::embeddings::{EmbeddingFile, EmbeddingSet};
use bccp::rng::Rng;
use bccp::shard::{merge_topk, search_shard, PartialTopK, ShardSpec, TopKContext};
use candle_core::{Device, Tensor};
use common::{asset, bccp, failure, make_folder, success};

/// `n` rows of `dim` values on a coarse grid (so distances tie exactly), none all-zero, with
/// every row at a border of a 3- or 7-shard split an exact copy of the row before it.
fn grid_rows(rng: &mut Rng, n: usize, dim: usize) -> Vec<f32> {
    let mut m: Vec<f32> = (0..n * dim)
        .map(|_| ((rng.unit_f64() * 5.0).floor() - 2.0) as f32 * 0.5)
        .collect();
    for row in m.chunks_mut(dim) {
        if row.iter().all(|&v| v == 0.0) {
            row[0] = 1.0;
        }
    }
    for count in [3usize, 7] {
        for j in 1..count {
            let b = ShardSpec::new(j, count).unwrap().range(n).start;
            if b > 0 && b < n {
                let (before, after) = m.split_at_mut(b * dim);
                after[..dim].copy_from_slice(&before[(b - 1) * dim..]);
            }
        }
    }
    m
}

fn context(s: &Search, nq: usize, rows: usize) -> TopKContext {
    TopKContext {
        k: s.k,
        metric: s.metric,
        other_class: s.other_class.is_some(),
        queries: nq,
        queries_sha256: "queries".into(),
        candidate_rows: rows,
        candidates_list_sha256: "list".into(),
        weights_sha256: "weights".into(),
    }
}

/// The partial results of `count` shards of the candidates.
fn parts(
    q: &[f32],
    c: &[f32],
    dim: usize,
    s: &Search,
    classes: (&[i64], &[i64]),
    count: usize,
) -> Vec<PartialTopK> {
    let n = c.len() / dim;
    (0..count)
        .map(|j| {
            let spec = ShardSpec::new(j, count).unwrap();
            let r = spec.range(n);
            let rows: Vec<i64> = r.clone().map(|i| i as i64).collect();
            let part_search = Search {
                other_class: s.other_class.map(|_| (classes.0, &classes.1[r.clone()])),
                ..*s
            };
            let found =
                search_shard(q, &c[r.start * dim..r.end * dim], dim, &part_search, &rows).unwrap();
            PartialTopK {
                shard: spec,
                context: context(s, q.len() / dim, n),
                indices: found.indices,
                values: found.values,
            }
        })
        .collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn merged_shards_equal_the_unsharded_search_bit_for_bit() {
    let mut rng = Rng::new(18);
    let mut compared = 0;
    let mut padded = 0;
    for &(n, nq, dim, k) in &[(50usize, 23usize, 8usize, 10usize), (500, 40, 12, 3)] {
        let c = grid_rows(&mut rng, n, dim);
        let mut q = grid_rows(&mut rng, nq, dim);
        // Some queries are exact copies of candidates at shard borders: distance-0 ties.
        for (qi, ci) in [(0usize, n / 3), (1, n / 7), (2, 2 * n / 7)] {
            q[qi * dim..(qi + 1) * dim].copy_from_slice(&c[ci * dim..(ci + 1) * dim]);
        }
        let qc: Vec<i64> = (0..nq as i64).map(|i| i % 2).collect();
        let cc: Vec<i64> = (0..n as i64).map(|i| i % 3).collect();
        for metric in [Metric::L1, Metric::L2, Metric::Cosine] {
            for other in [false, true] {
                let s = Search {
                    metric,
                    k,
                    other_class: other.then_some((&qc[..], &cc[..])),
                    precision: Precision::F32,
                };
                let want = search_host(&q, &c, dim, &s).unwrap();
                for count in [1usize, 3, 7] {
                    let ctx = format!("n={n} {metric:?} other={other} N={count}");
                    let p = parts(&q, &c, dim, &s, (&qc, &cc), count);
                    padded += p.iter().filter(|p| p.indices.contains(&-1)).count();
                    let names: Vec<String> = (0..count).map(|j| format!("part{j}")).collect();
                    let mut named: Vec<(&str, &PartialTopK)> =
                        names.iter().map(String::as_str).zip(&p).collect();
                    let merged = merge_topk(&named).unwrap();
                    assert_eq!(merged.indices, want.indices, "{ctx}");
                    assert_eq!(bits(&merged.values), bits(&want.values), "{ctx}");
                    assert_eq!(merged.shard, ShardSpec::WHOLE);
                    // Any order of the parts gives the same result.
                    named.reverse();
                    assert_eq!(merge_topk(&named).unwrap(), merged, "{ctx} reversed");
                    named.rotate_left(count / 2);
                    assert_eq!(merge_topk(&named).unwrap(), merged, "{ctx} rotated");
                    compared += 1;
                }
            }
        }
    }
    assert_eq!(compared, 2 * 3 * 2 * 3);
    // 7 shards of 50 rows (7 or 8 rows each) with the other-class rule leave fewer than k = 10
    // eligible rows: those parts were padded with the "none" marker.
    assert!(padded > 0);
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Writes random embeddings with the given weights hash and list fingerprint.
fn write_set(path: &Path, n: usize, dim: usize, seed: u64, weights: &str, list: &str) {
    let mut rng = Rng::new(seed);
    let mut values = grid_rows(&mut rng, n, dim);
    values
        .iter_mut()
        .for_each(|v| *v += rng.unit_f64() as f32 * 0.01);
    write_rows(path, &values, dim, weights, list);
}

/// Writes the rows `values` (`dim` columns) as an embedding set of 3 classes.
fn write_rows(path: &Path, values: &[f32], dim: usize, weights: &str, list: &str) {
    let n = values.len() / dim;
    EmbeddingSet {
        embeddings: Tensor::from_slice(values, (n, dim), &Device::Cpu).unwrap(),
        targets: (0..n as i64).map(|i| i % 3).collect(),
        ids: None,
        paths: (0..n).map(|i| format!("c{}/{i}.png", i % 3)).collect(),
        classes: (0..3).map(|c| format!("c{c}")).collect(),
        model: "test".into(),
        weights_sha256: weights.into(),
        list_sha256: list.into(),
        shard: None,
    }
    .save(path)
    .unwrap();
}

fn closest(q: &Path, c: &Path, out: &Path, metric: &str, k: &str, extra: &[&str]) -> String {
    success(&closest_run(q, c, out, metric, k, extra))
}

/// `bccp closest` on the CPU, succeeding or not.
fn closest_run(
    q: &Path,
    c: &Path,
    out: &Path,
    metric: &str,
    k: &str,
    extra: &[&str],
) -> std::process::Output {
    let mut args = vec![
        "closest",
        "--queries",
        s(q),
        "--candidates",
        s(c),
        "--metric",
        metric,
        "--k",
        k,
        "--out",
        s(out),
        "--device",
        "cpu",
    ];
    args.extend_from_slice(extra);
    bccp(&args)
}

fn merge(out: &Path, parts: &[&PathBuf]) -> std::process::Output {
    let mut args = vec!["merge-topk", "--out", s(out)];
    args.extend(parts.iter().map(|p| s(p)));
    bccp(&args)
}

#[test]
fn closest_shards_and_merge_topk_reproduce_closest_byte_for_byte() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let (q, c) = (d.join("q.safetensors"), d.join("c.safetensors"));
    write_set(&q, 17, 6, 1, "w", "list-q");
    write_set(&c, 40, 6, 2, "w", "list-c");
    for (metric, extra) in [
        ("l2", vec!["--other-class"]),
        ("cosine", vec![]),
        ("l1", vec![]),
    ] {
        let whole = d.join(format!("whole-{metric}.safetensors"));
        closest(&q, &c, &whole, metric, "4", &extra);
        let parts: Vec<PathBuf> = (0..3)
            .map(|j| {
                let p = d.join(format!("{metric}-{j}.safetensors"));
                let shard = format!("{j}/3");
                let mut args = extra.clone();
                args.extend(["--candidates-shard", shard.as_str()]);
                let out = closest(&q, &c, &p, metric, "4", &args);
                assert!(out.contains(&format!("(shard {j}/3 of 40 rows)")), "{out}");
                p
            })
            .collect();
        let merged = d.join(format!("merged-{metric}.safetensors"));
        let out = success(&merge(&merged, &[&parts[2], &parts[0], &parts[1]]));
        assert!(out.contains("merged 3 shards"), "{out}");
        assert_eq!(
            std::fs::read(&merged).unwrap(),
            std::fs::read(&whole).unwrap(),
            "{metric}: merged file differs from the unsharded one"
        );
    }
    // A shard with fewer rows than k pads with the "none" marker instead of failing.
    let p = d.join("tiny.safetensors");
    let out = closest(&q, &c, &p, "cosine", "9", &["--candidates-shard", "5/7"]);
    assert!(out.contains("slots without an eligible candidate"), "{out}");
    let part = PartialTopK::load(&p).unwrap();
    let range = ShardSpec::new(5, 7).unwrap().range(40);
    assert_eq!(range.len(), 6);
    for row in 0..17 {
        let idx = &part.indices[row * 9..(row + 1) * 9];
        assert!(idx[..6].iter().all(|&i| range.contains(&(i as usize))));
        assert_eq!(&idx[6..], &[-1, -1, -1]);
        assert!(part.values[row * 9 + 6..(row + 1) * 9]
            .iter()
            .all(|&v| v == f32::NEG_INFINITY));
    }
}

#[test]
fn closest_precision_bf16_writes_the_f32_result_and_refuses_what_it_cannot_do() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let (q, c) = (d.join("q.safetensors"), d.join("c.safetensors"));
    // Copies of 4 centres moved by at most 1e-4 per value: far more candidates within bf16's
    // rounding of each other than the margin, so queries cannot be certified and are searched
    // again in f32 (the note says so).
    let mut rng = Rng::new(3);
    let dim = 48;
    let centres = grid_rows(&mut rng, 4, dim);
    let mut near = |n: usize| -> Vec<f32> {
        (0..n * dim)
            .map(|i| centres[(i / dim % 4) * dim + i % dim] + (rng.unit_f64() as f32 - 0.5) * 2e-4)
            .collect()
    };
    write_rows(&q, &near(30), dim, "w", "list-q");
    write_rows(&c, &near(600), dim, "w", "list-c");
    let mut noted = false;
    for (metric, extra) in [("l2", vec!["--other-class"]), ("cosine", vec![])] {
        let f32_out = d.join(format!("{metric}-f32.safetensors"));
        let bf16_out = d.join(format!("{metric}-bf16.safetensors"));
        closest(&q, &c, &f32_out, metric, "5", &extra);
        let mut args = extra.clone();
        args.extend(["--precision", "bf16"]);
        let run = closest_run(&q, &c, &bf16_out, metric, "5", &args);
        success(&run);
        let stderr = String::from_utf8_lossy(&run.stderr);
        noted |= stderr.contains("bf16 pre-selection could not be proven exact")
            || stderr.contains("no AVX512-BF16");
        assert_eq!(
            std::fs::read(&bf16_out).unwrap(),
            std::fs::read(&f32_out).unwrap(),
            "{metric}: --precision bf16 wrote another result than f32"
        );
    }
    assert!(
        noted,
        "no query fell back to f32 on near-duplicate grid data"
    );
    let out = d.join("x.safetensors");
    let err = failure(&closest_run(
        &q,
        &c,
        &out,
        "l1",
        "1",
        &["--precision", "bf16"],
    ));
    assert!(
        err.contains("--precision bf16 applies to --metric l2 and cosine"),
        "{err}"
    );
    let err = failure(&closest_run(
        &q,
        &c,
        &out,
        "l2",
        "1",
        &["--precision", "fp8"],
    ));
    assert!(
        err.contains("--precision") && err.contains("f32") && err.contains("bf16"),
        "{err}"
    );
}

#[test]
fn bad_sets_of_parts_are_refused_naming_the_files() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let (q, q2, c, c_other) = (
        d.join("q.safetensors"),
        d.join("q2.safetensors"),
        d.join("c.safetensors"),
        d.join("c-other.safetensors"),
    );
    write_set(&q, 5, 4, 1, "w", "lq");
    write_set(&q2, 5, 4, 9, "w", "lq");
    write_set(&c, 30, 4, 2, "w", "lc");
    // The same candidates embedded by other weights: another run.
    write_set(&c_other, 30, 4, 2, "v", "lc");
    let part = |name: &str, query: &Path, cand: &Path, shard: &str, metric: &str, k: &str| {
        let p = d.join(name);
        closest(query, cand, &p, metric, k, &["--candidates-shard", shard]);
        p
    };
    let p0 = part("p0.st", &q, &c, "0/3", "l2", "2");
    let p1 = part("p1.st", &q, &c, "1/3", "l2", "2");
    let p2 = part("p2.st", &q, &c, "2/3", "l2", "2");
    let out = d.join("m.st");
    let err = |parts: &[&PathBuf]| failure(&merge(&out, parts));

    let e = err(&[&p0, &p1]);
    assert!(e.contains("shard(s) 2 of 3 missing"), "{e}");
    let e = err(&[&p0, &p1, &p2, &p1]);
    assert!(
        e.contains("p1.st and") && e.contains("both shard 1/3"),
        "{e}"
    );
    let half = part("half.st", &q, &c, "1/2", "l2", "2");
    let e = err(&[&p0, &half, &p2]);
    assert!(
        e.contains("half.st is shard 1/2 of 2, but") && e.contains("p0.st is of 3"),
        "{e}"
    );
    let k3 = part("k3.st", &q, &c, "1/3", "l2", "3");
    let e = err(&[&p0, &k3, &p2]);
    assert!(
        e.contains("k3.st has k 3, but") && e.contains("p0.st has 2"),
        "{e}"
    );
    let l1 = part("l1.st", &q, &c, "1/3", "l1", "2");
    let e = err(&[&p0, &l1, &p2]);
    assert!(e.contains("l1.st has metric L1"), "{e}");
    let other_q = part("oq.st", &q2, &c, "1/3", "l2", "2");
    let e = err(&[&p0, &other_q, &p2]);
    assert!(e.contains("oq.st has queries fingerprint"), "{e}");
    let other_run = part("run.st", &q, &c_other, "1/3", "l2", "2");
    let e = err(&[&p0, &other_run, &p2]);
    assert!(
        e.contains("run.st has weights hash v") && e.contains("different embedding runs"),
        "{e}"
    );
    let e = err(&[&q]);
    assert!(
        e.contains("q.safetensors") && e.contains("no `format`"),
        "{e}"
    );
    assert!(!out.exists());
    let e = failure(&bccp(&[
        "closest",
        "--queries",
        s(&q),
        "--candidates",
        s(&c),
        "--metric",
        "l2",
        "--candidates-shard",
        "3/3",
        "--out",
        s(&out),
    ]));
    assert!(
        e.contains("--candidates-shard") && e.contains("expected I/N"),
        "{e}"
    );
    // Three good parts in any order do merge.
    success(&merge(&out, &[&p2, &p1, &p0]));
}

fn embed(data: &Path, out: &Path, shard: Option<&str>) -> String {
    let weights = asset("weights/mobilenet_v2.safetensors");
    let mut args = vec![
        "embed",
        "--data",
        s(data),
        "--model",
        "mobilenet_v2",
        "--weights",
        weights.to_str().unwrap(),
        "--out",
        s(out),
        "--device",
        "cpu",
        "--batch",
        "1",
        "--no-cache",
    ];
    if let Some(shard) = shard {
        args.extend(["--shard", shard]);
    }
    success(&bccp(&args))
}

#[test]
fn embed_shards_search_and_merge_like_one_embedding() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let src = d.join("src");
    make_folder(&src, &[3, 2, 2]);
    let whole = d.join("whole.safetensors");
    embed(&src, &whole, None);
    let shards: Vec<PathBuf> = (0..3)
        .map(|j| {
            let p = d.join(format!("e{j}.safetensors"));
            let out = embed(&src, &p, Some(&format!("{j}/3")));
            assert!(out.contains(&format!("(shard {j}/3: images")), "{out}");
            p
        })
        .collect();
    // The shards hold the whole file's rows, with their global ids and the list's identity.
    let all = EmbeddingFile::open(&whole).unwrap();
    let mut next = 0;
    for (j, p) in shards.iter().enumerate() {
        let f = EmbeddingFile::open(p).unwrap();
        assert_eq!(f.shard().unwrap(), Some(ShardSpec::new(j, 3).unwrap()));
        assert_eq!(f.total_rows().unwrap(), 7);
        assert_eq!(f.meta("list_sha256"), all.meta("list_sha256"));
        assert_eq!(f.meta("weights_sha256"), all.meta("weights_sha256"));
        let ids = f.global_ids();
        assert_eq!(ids, (next..next + f.rows() as i64).collect::<Vec<_>>());
        let d = all.dim();
        let whole_rows = &all.embeddings()[next as usize * d..(next as usize + f.rows()) * d];
        assert_eq!(bits(&f.embeddings()), bits(whole_rows), "shard {j}");
        next += f.rows() as i64;
    }
    assert_eq!(next, 7);
    assert!(!all.meta("list_sha256").is_empty());

    // closest over each shard file, merged == closest over the whole file.
    let want = d.join("nn-whole.safetensors");
    closest(&whole, &whole, &want, "l2", "3", &["--other-class"]);
    let parts: Vec<PathBuf> = shards
        .iter()
        .enumerate()
        .map(|(j, p)| {
            let out = d.join(format!("nn-{j}.safetensors"));
            closest(&whole, p, &out, "l2", "3", &["--other-class"]);
            out
        })
        .collect();
    let merged = d.join("nn-merged.safetensors");
    success(&merge(&merged, &[&parts[1], &parts[2], &parts[0]]));
    assert_eq!(
        std::fs::read(&merged).unwrap(),
        std::fs::read(&want).unwrap()
    );

    // A shard file only searches its own shard.
    let e = failure(&bccp(&[
        "closest",
        "--queries",
        s(&whole),
        "--candidates",
        s(&shards[1]),
        "--metric",
        "l2",
        "--candidates-shard",
        "0/3",
        "--out",
        s(&merged),
    ]));
    assert!(e.contains("e1.safetensors holds shard 1/3"), "{e}");

    // A shard of another image list is refused at merge time.
    let other = d.join("other");
    make_folder(&other, &[3, 2, 3]);
    let foreign = d.join("foreign.safetensors");
    embed(&other, &foreign, Some("1/3"));
    let foreign_part = d.join("nn-foreign.safetensors");
    closest(
        &whole,
        &foreign,
        &foreign_part,
        "l2",
        "3",
        &["--other-class"],
    );
    let e = failure(&merge(&merged, &[&parts[0], &foreign_part, &parts[2]]));
    assert!(
        e.contains("nn-foreign.safetensors has candidate row count 8")
            || e.contains("nn-foreign.safetensors has image-list fingerprint"),
        "{e}"
    );
}

/// Writes `values` (f64) as .npy of the given shape.
fn npy(path: &Path, shape: &[usize], values: &[f64]) {
    bccp::npy::write_f64(path, shape, values).unwrap();
}

fn mask(path: &Path) -> Vec<bool> {
    bccp::npy::read(path)
        .unwrap()
        .values
        .iter()
        .map(|&v| v != 0.0)
        .collect()
}

#[test]
fn per_shard_scores_and_probabilities_cut_like_the_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let mut rng = Rng::new(7);
    let (n, classes) = (61usize, 3usize);
    // Coarse scores (ties), labels, and noisy predicted probabilities.
    let scores: Vec<f64> = (0..n).map(|_| (rng.unit_f64() * 8.0).floor()).collect();
    let labels: Vec<f64> = (0..n).map(|i| (i % classes) as f64).collect();
    let probs: Vec<f64> = (0..n)
        .flat_map(|i| {
            let mut p: Vec<f64> = (0..classes).map(|_| rng.unit_f64() + 0.05).collect();
            p[i % classes] += if i % 5 == 0 { 0.0 } else { 1.5 };
            let sum: f64 = p.iter().sum();
            p.into_iter().map(move |v| v / sum)
        })
        .collect();
    let cuts = [0usize, 20, 21, 61];
    let path = |name: &str| d.join(name);
    npy(&path("s.npy"), &[n], &scores);
    npy(&path("l.npy"), &[n], &labels);
    npy(&path("p.npy"), &[n, classes], &probs);
    for j in 0..3 {
        let (a, b) = (cuts[j], cuts[j + 1]);
        npy(&path(&format!("s{j}.npy")), &[b - a], &scores[a..b]);
        npy(&path(&format!("l{j}.npy")), &[b - a], &labels[a..b]);
        npy(
            &path(&format!("p{j}.npy")),
            &[b - a, classes],
            &probs[a * classes..b * classes],
        );
    }
    let p = |name: String| path(&name).to_str().unwrap().to_owned();
    for scope in ["global", "per_class"] {
        let mut whole = vec!["cut-scores", "--scope", scope, "--percentile", "80"];
        let (s0, l0, w) = (p("s.npy".into()), p("l.npy".into()), p("w.npy".into()));
        whole.extend(["--scores", &s0, "--labels", &l0, "--out", &w]);
        success(&bccp(&whole));
        let mut sharded: Vec<String> = ["cut-scores", "--scope", scope, "--percentile", "80"]
            .map(String::from)
            .to_vec();
        for j in 0..3 {
            sharded.extend([
                "--scores".into(),
                p(format!("s{j}.npy")),
                "--labels".into(),
                p(format!("l{j}.npy")),
                "--out".into(),
                p(format!("m{j}.npy")),
            ]);
        }
        let args: Vec<&str> = sharded.iter().map(String::as_str).collect();
        let out = success(&bccp(&args));
        assert!(out.contains("over 3 shards"), "{out}");
        let got: Vec<bool> = (0..3)
            .flat_map(|j| mask(&path(&format!("m{j}.npy"))))
            .collect();
        let want = mask(&path("w.npy"));
        assert_eq!(got, want, "{scope}");
        assert_eq!(
            want.iter().filter(|&&m| m).count(),
            12,
            "{scope}: 20% of 61"
        );
    }
    let e = failure(&bccp(&[
        "cut-scores",
        "--scope",
        "per_class",
        "--scores",
        &p("s0.npy".into()),
        "--out",
        &p("x.npy".into()),
    ]));
    assert!(e.contains("per_class needs --labels"), "{e}");

    // Confident learning over shards of probabilities = the unsharded masks, split.
    success(&bccp(&[
        "label-issues",
        "--pred-probs",
        &p("p.npy".into()),
        "--labels",
        &p("l.npy".into()),
        "--out",
        &p("cl.npy".into()),
    ]));
    let mut args: Vec<String> = vec!["label-issues".into()];
    for j in 0..3 {
        args.extend([
            "--pred-probs".into(),
            p(format!("p{j}.npy")),
            "--labels".into(),
            p(format!("l{j}.npy")),
            "--out".into(),
            p(format!("cl{j}.npy")),
        ]);
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    success(&bccp(&refs));
    let got: Vec<bool> = (0..3)
        .flat_map(|j| mask(&path(&format!("cl{j}.npy"))))
        .collect();
    let want = mask(&path("cl.npy"));
    assert!(want.iter().any(|&m| m), "some labels are flagged");
    assert_eq!(got, want);
    let e = failure(&bccp(&refs[..refs.len() - 2]));
    assert!(
        e.contains("3 --pred-probs need 3 --labels and 3 --out"),
        "{e}"
    );
}
