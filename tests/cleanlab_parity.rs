//! bccp's confident learning against cleanlab's `find_label_issues` on the fixture written by
//! `scripts/cleanlab_fixture.py` (a realistic noisy 400 × 10 case, float32 and float64, and a
//! case with a class no sample is labelled): every mask must be identical, sample by sample.

use bccp::baselines::{
    compute_confident_joint, confident_thresholds, find_label_issues, numpy_argsort, FilterBy, Prob,
};
use serde_json::Value;

fn fixture() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/cleanlab_parity.json"
    );
    let text = std::fs::read_to_string(path).expect("fixture readable");
    serde_json::from_str(&text).expect("fixture is JSON")
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number"))
        .collect()
}

fn ints(v: &Value) -> Vec<i64> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_i64().expect("integer"))
        .collect()
}

fn bools(v: &Value) -> Vec<bool> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_bool().expect("bool"))
        .collect()
}

struct Case {
    probs: Vec<f32>,
    labels: Vec<u32>,
    k: usize,
}

fn case(v: &Value) -> Case {
    let (n, k) = (
        v["n"].as_u64().unwrap() as usize,
        v["k"].as_u64().unwrap() as usize,
    );
    let rows = v["pred_probs"].as_array().expect("rows");
    assert_eq!(rows.len(), n);
    let probs: Vec<f32> = rows
        .iter()
        .flat_map(|r| {
            let row = floats(r);
            assert_eq!(row.len(), k);
            row
        })
        .map(|x| x as f32)
        .collect();
    let labels: Vec<u32> = ints(&v["labels"]).into_iter().map(|l| l as u32).collect();
    assert_eq!(labels.len(), n);
    Case { probs, labels, k }
}

/// Asserts `ours == theirs`, listing the first differences.
fn same_mask(what: &str, ours: &[bool], theirs: &[bool]) {
    assert_eq!(ours.len(), theirs.len(), "{what}: length");
    let diff: Vec<usize> = (0..ours.len()).filter(|&i| ours[i] != theirs[i]).collect();
    let count = |m: &[bool]| m.iter().filter(|&&b| b).count();
    assert!(
        diff.is_empty(),
        "{what}: {} of {} samples differ (bccp flags {}, cleanlab {}); first: {:?}",
        diff.len(),
        ours.len(),
        count(ours),
        count(theirs),
        diff.iter()
            .take(10)
            .map(|&i| (i, ours[i], theirs[i]))
            .collect::<Vec<_>>()
    );
}

fn check_masks<T: Prob>(what: &str, probs: &[T], c: &Case, masks: &Value) {
    for &f in <FilterBy as clap::ValueEnum>::value_variants() {
        let ours = find_label_issues(probs, &c.labels, c.k, f).expect("valid input");
        same_mask(&format!("{what} {f}"), &ours, &bools(&masks[f.name()]));
    }
}

#[test]
fn masks_match_cleanlab_on_every_sample() {
    let fx = fixture();
    let main = case(&fx);
    assert_eq!(main.probs.len(), 400 * 10);
    check_masks("float32", &main.probs, &main, &fx["masks"]);
    let wide: Vec<f64> = main.probs.iter().map(|&p| f64::from(p)).collect();
    check_masks("float64", &wide, &main, &fx["masks_f64"]);
    let missing = &fx["missing_class_case"];
    let m = case(missing);
    assert!(
        !m.labels.contains(&(m.k as u32 - 1)),
        "a class has no label"
    );
    check_masks("missing class", &m.probs, &m, &missing["masks"]);
}

#[test]
fn thresholds_and_confident_joint_match_cleanlab() {
    let fx = fixture();
    let c = case(&fx);
    // Compared as float32 (the fixture's exact float32 values, whatever the float64 parse).
    let as_f32 = |v: Vec<f64>| v.into_iter().map(|t| t as f32).collect::<Vec<_>>();
    let ours = confident_thresholds(&c.probs, &c.labels, c.k).unwrap();
    assert_eq!(
        as_f32(ours),
        as_f32(floats(&fx["thresholds"])),
        "thresholds"
    );
    let cj = compute_confident_joint(&c.probs, &c.labels, c.k).unwrap();
    let theirs: Vec<Vec<i64>> = fx["confident_joint"]
        .as_array()
        .unwrap()
        .iter()
        .map(ints)
        .collect();
    assert_eq!(cj.calibrated, theirs, "calibrated confident joint");
    let off: Vec<usize> = ints(&fx["off_diagonal"])
        .into_iter()
        .map(|i| i as usize)
        .collect();
    assert_eq!(cj.off_diagonal, off);
    // The fixture is meant to exercise the tie order: some flags depend on it.
    let ties = &fx["tie_order_dependent_flags"]["main_f32"];
    assert!(
        ties.as_object().is_some_and(|o| !o.is_empty()),
        "fixture without tie-dependent flags: {ties}"
    );
}

#[test]
fn argsort_matches_numpy_tie_order() {
    let fx = fixture();
    for (n, c) in fx["argsort_cases"].as_array().unwrap().iter().enumerate() {
        let values = floats(&c["values"]);
        let expected: Vec<usize> = ints(&c["order"]).into_iter().map(|i| i as usize).collect();
        let ours = match c["dtype"].as_str().unwrap() {
            "f32" => numpy_argsort(&values.iter().map(|&v| v as f32).collect::<Vec<_>>()),
            _ => numpy_argsort(&values),
        };
        let first = (0..ours.len()).find(|&i| ours[i] != expected[i]);
        assert!(
            first.is_none(),
            "case {n} ({} {}): first difference at {first:?}: ours {:?}, numpy {:?}",
            c["dtype"],
            values.len(),
            &ours[first.unwrap_or(0)..(first.unwrap_or(0) + 8).min(ours.len())],
            &expected[first.unwrap_or(0)..(first.unwrap_or(0) + 8).min(ours.len())],
        );
    }
}

/// Many more cases, written by `scripts/cleanlab_fixture.py --stress N --out FILE` and named by
/// `CLEANLAB_PARITY_STRESS=FILE` (class sizes and class counts above 256 reach numpy's
/// partitioning and std::sort paths; saturated probabilities give exact ties):
/// `cargo test --release --test cleanlab_parity -- --ignored`.
#[test]
#[ignore = "needs CLEANLAB_PARITY_STRESS=<file from cleanlab_fixture.py --stress>"]
fn stress_cases() {
    let path = std::env::var("CLEANLAB_PARITY_STRESS").expect("CLEANLAB_PARITY_STRESS set");
    let text = std::fs::read_to_string(&path).expect("stress file readable");
    let all: Value = serde_json::from_str(&text).expect("stress file is JSON");
    let cases = all["cases"].as_array().expect("cases");
    for v in cases {
        let c = case(v);
        let what = format!("seed {} ({} x {})", v["seed"], c.labels.len(), c.k);
        check_masks(&format!("{what} float32"), &c.probs, &c, &v["masks"]);
        let wide: Vec<f64> = c.probs.iter().map(|&p| f64::from(p)).collect();
        check_masks(&format!("{what} float64"), &wide, &c, &v["masks_f64"]);
    }
    eprintln!("{} stress cases match cleanlab", cases.len());
}
