//! `cutoff_scores`: the Bayesian MC-dropout cut-off of `bccp train --method bccp`
//! (`bccp::cleanse::cleanse`) on features the caller brings.

use bccp::cleanse::{cleanse, CleanseError, Method};
use bccp::config::RunConfig;
use bccp::progress::Progress;
use candle_core::{Device, Tensor};
use numpy::{PyReadonlyArray1, PyReadonlyArray2};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::arrays::{matrix, to_vector, vector};
use crate::errors::{compute, input_error, Failure};

/// The settings `cutoff_scores` takes, named as `bccp train`'s flags without the dashes.
pub const SETTINGS: [&str; 14] = [
    "cutoff_score",
    "cutoff_percentile",
    "cutoff_scope",
    "cutoff_folds",
    "cutoff_rounds",
    "cutoff_action",
    "relabel_confidence",
    "cutoff_trust_replay",
    "mc_passes",
    "epochs",
    "batch_size",
    "lr",
    "lr_decay",
    "seed",
];

/// `bccp train`'s defaults overridden by `settings` (a JSON object), checked as the CLI checks
/// them.
fn settings(json: &str) -> PyResult<RunConfig> {
    let given: serde_json::Map<String, serde_json::Value> = match serde_json::from_str(json) {
        Ok(v) => v,
        Err(e) => return input_error(format!("settings are not a JSON object: {e}")),
    };
    if let Some(bad) = given.keys().find(|k| !SETTINGS.contains(&k.as_str())) {
        return input_error(format!(
            "unknown cut-off setting {bad:?}; valid: {}",
            SETTINGS.join(", ")
        ));
    }
    let mut merged = match serde_json::to_value(RunConfig::default()) {
        Ok(serde_json::Value::Object(m)) => m,
        _ => return Err(Failure::runtime("cannot serialise the default settings").into()),
    };
    merged.extend(given);
    let mut cfg: RunConfig = match serde_json::from_value(serde_json::Value::Object(merged)) {
        Ok(cfg) => cfg,
        Err(e) => return input_error(format!("bad cut-off setting: {e}")),
    };
    cfg.method = Method::Bccp;
    cfg.validate_cleansing().map_err(Failure::input)?;
    Ok(cfg)
}

/// The Bayesian cut-off of samples `features` float32 [n, F] with labels int64 [n] in
/// `0..classes`: MC-dropout heads are trained on the features, every sample is scored and the
/// cut applied, exactly as `bccp train --method bccp` does on its candidates. `replayed` (bool
/// [n]) marks replayed rows (trusted with `cutoff_trust_replay`). `settings_json` overrides
/// `bccp train`'s defaults. Returns a dict: `scores` float32 [n], `flagged` bool [n], `kept`
/// int64 (indices trained on), `labels` int64 [n] (after relabelling), `removed`,
/// `relabelled`.
#[pyfunction]
#[pyo3(signature = (features, labels, classes, replayed=None, settings_json="{}"))]
pub fn cutoff_scores<'py>(
    py: Python<'py>,
    features: PyReadonlyArray2<'py, f32>,
    labels: PyReadonlyArray1<'py, i64>,
    classes: usize,
    replayed: Option<PyReadonlyArray1<'py, bool>>,
    settings_json: &str,
) -> PyResult<Bound<'py, PyDict>> {
    let cfg = settings(settings_json)?;
    let (x, n, f) = matrix(&features, "features")?;
    let given = vector(&labels, "labels")?;
    if given.len() != n {
        return input_error(format!(
            "labels has {} entries but features has {n} rows; they must match",
            given.len()
        ));
    }
    if classes < 2 {
        return input_error(format!("classes {classes} must be 2 or more"));
    }
    let given: Vec<u32> = given
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            if v >= 0 && (v as u64) < classes as u64 {
                Ok(v as u32)
            } else {
                input_error(format!(
                    "labels: label {v} at index {i} is not a class index in 0..{classes}"
                ))
            }
        })
        .collect::<PyResult<_>>()?;
    let replayed = match &replayed {
        Some(r) => {
            let r = vector(r, "replayed")?;
            if r.len() != n {
                return input_error(format!(
                    "replayed has {} entries but features has {n} rows; they must match",
                    r.len()
                ));
            }
            r.to_vec()
        }
        None => Vec::new(),
    };
    if let Some(row) = x
        .chunks(f.max(1))
        .position(|r| r.iter().any(|v| !v.is_finite()))
    {
        return input_error(format!("features row {row} holds a NaN or infinite value"));
    }
    let out = compute(py, || {
        let t = Tensor::from_slice(x, (n, f), &Device::Cpu).map_err(Failure::runtime)?;
        cleanse(
            &cfg.cleanse(),
            &t,
            &given,
            &replayed,
            // No verified labels from Python (yet): every row may be cut.
            &vec![false; given.len()],
            classes,
            &cfg.train(),
            &Progress::hidden(),
        )
        .map_err(|e| match e {
            CleanseError::Tensor(_) => Failure::runtime(e),
            _ => Failure::input(e),
        })
    })?;
    let dict = PyDict::new(py);
    dict.set_item("scores", to_vector(py, out.scores.unwrap_or_default()))?;
    dict.set_item("flagged", to_vector(py, out.flagged))?;
    dict.set_item(
        "kept",
        to_vector(py, out.kept.iter().map(|&i| i64::from(i)).collect()),
    )?;
    dict.set_item(
        "labels",
        to_vector(py, out.labels.iter().map(|&l| i64::from(l)).collect()),
    )?;
    dict.set_item("removed", out.removed)?;
    dict.set_item("relabelled", out.relabelled)?;
    Ok(dict)
}
