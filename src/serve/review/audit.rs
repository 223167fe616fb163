//! `--review-audit DIR`: the label issues of a `bccp audit --db` report, checked against the
//! store (each sample id must name the stored sample with the image the audit saw).

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::Entry;
use crate::serve::error::ServeError;
use crate::store::{SampleFilter, Store};

/// The samples of an audit to review, worst label score first.
#[derive(Debug, Clone)]
pub(crate) struct AuditEntries {
    pub dir: PathBuf,
    pub entries: Vec<Entry>,
}

/// Reads `dir/report.jsonl`, keeps the lines flagged as label issues, and checks each against
/// `store`.
pub(crate) fn load_audit(dir: &Path, store: &mut dyn Store) -> Result<AuditEntries, ServeError> {
    let file = dir.join("report.jsonl");
    let text = std::fs::read_to_string(&file).map_err(|error| ServeError::Io {
        path: file.clone(),
        error,
    })?;
    let bad = |line: usize, what: String| {
        ServeError::invalid(
            "--review-audit",
            dir.display(),
            format!("{} line {line}: {what}", file.display()),
        )
    };
    let classes = store.classes()?;
    let mut entries = Vec::new();
    for (n, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let line_no = n + 1;
        let v: Value = serde_json::from_str(line).map_err(|e| bad(line_no, e.to_string()))?;
        if v.get("label_issue") != Some(&Value::Bool(true)) {
            continue;
        }
        let id = v.get("id").and_then(Value::as_i64).ok_or_else(|| {
            bad(
                line_no,
                "a label issue without a store sample id: review needs an audit of the store \
                 (`bccp audit --db URL`)"
                    .into(),
            )
        })?;
        let path = v.get("path").and_then(Value::as_str).unwrap_or_default();
        let stored = store.samples(
            &SampleFilter {
                after_id: id - 1,
                up_to_id: Some(id),
                ..SampleFilter::default()
            },
            1,
        )?;
        match stored.first() {
            Some(s) if s.image_path == path => {}
            Some(s) => {
                return Err(bad(
                    line_no,
                    format!(
                        "sample {id} of {} is {}, not {path}: this audit is not of this store \
                         (audit it with `bccp audit --db`)",
                        store.location(),
                        s.image_path
                    ),
                ))
            }
            None => {
                return Err(bad(
                    line_no,
                    format!("sample {id} is not in {}", store.location()),
                ))
            }
        }
        let suggested = v
            .get("suggested_label")
            .and_then(Value::as_str)
            .and_then(|name| classes.iter().position(|c| c == name))
            .map(|i| i as i64);
        let score = v.get("label_score").and_then(Value::as_f64).unwrap_or(0.0);
        entries.push(Entry {
            sample_id: id,
            score,
            suggested,
        });
    }
    entries.sort_by(|a, b| {
        b.score
            .total_cmp(&a.score)
            .then(a.sample_id.cmp(&b.sample_id))
    });
    Ok(AuditEntries {
        dir: dir.to_path_buf(),
        entries,
    })
}
