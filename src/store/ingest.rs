//! `bccp ingest`: how a user feeds the store, from an image folder (`ROOT/<class>/…`, scanned
//! like every dataset) or a JSON Lines file (`{"path": …, "label": …, "timestamp": …}`).
//!
//! Every file is read once, hashed (SHA-256) and decoded with the strict decoder of the data
//! layer. A file whose content is already stored (or seen earlier in the same ingest) is a
//! duplicate: reported and skipped. A file that cannot be read or decoded is stored as
//! *rejected* with the reason, and the ingest goes on. Rows are written in batched
//! transactions, keyed by content, so an ingest interrupted and run again adds nothing twice.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::error::{Result, StoreError};
use super::{NewSample, SampleStatus, Split, Store};
use crate::data::decode::{decode_bytes, read_image_file};
use crate::data::timestamp::{format_utc, parse_rfc3339};
use crate::data::{DataError, ImageFolder, SkipCount};
use crate::hash::sha256_hex;

/// Where the samples come from.
#[derive(Debug, Clone)]
pub enum IngestInput {
    /// An image folder, `ROOT/<class>/**/<image>`.
    Folder(PathBuf),
    /// A JSON Lines file; relative paths are relative to its folder.
    Jsonl(PathBuf),
}

/// Parameters of [`ingest`].
#[derive(Debug, Clone)]
pub struct IngestOptions {
    pub input: IngestInput,
    /// The `source` column of the rows (e.g. a camera or a day).
    pub source: String,
    /// Rows per transaction.
    pub batch_size: usize,
}

/// A file that was not stored as an accepted sample.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Note {
    /// Same content as a stored sample or a file earlier in this ingest.
    Duplicate { path: PathBuf },
    /// Stored as rejected.
    Rejected { path: PathBuf, reason: String },
}

/// What [`ingest`] did.
#[derive(Debug, Clone, Default)]
pub struct IngestSummary {
    pub accepted: u64,
    pub duplicates: u64,
    /// Rejected files per reason kind (`undecodable`, `too_large`, `not_a_file`, …).
    pub rejected: BTreeMap<&'static str, u64>,
    /// Each duplicate and rejected file, in input order.
    pub notes: Vec<Note>,
    /// What the folder scan skipped (not images by extension, hidden, …).
    pub scan_skipped: Vec<SkipCount>,
    /// Ended early by the stop callback.
    pub stopped: bool,
}

impl IngestSummary {
    /// `accepted 10, duplicates 2, rejected 3 (undecodable 2, not_a_file 1)`.
    pub fn line(&self) -> String {
        let rejected: u64 = self.rejected.values().sum();
        let mut line = format!(
            "accepted {}, duplicates {}, rejected {rejected}",
            self.accepted, self.duplicates
        );
        if rejected > 0 {
            let kinds: Vec<String> = self
                .rejected
                .iter()
                .map(|(k, n)| format!("{k} {n}"))
                .collect();
            line.push_str(&format!(" ({})", kinds.join(", ")));
        }
        line
    }
}

/// A line of the JSON Lines input.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    path: PathBuf,
    label: Label,
    #[serde(default)]
    timestamp: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Label {
    Index(i64),
    Name(String),
}

/// One file to ingest, its label resolved to a class index of the store.
struct Item {
    path: PathBuf,
    label: i64,
    timestamp: String,
}

/// The kind of a bad image, for the summary.
fn reason_kind(e: &DataError) -> &'static str {
    match e {
        DataError::Decode { .. } => "undecodable",
        DataError::ImageTooLarge { .. } => "too_large",
        DataError::NotAFile { .. } => "not_a_file",
        DataError::BrokenLink { .. } => "broken_link",
        _ => "unreadable",
    }
}

/// Reads the JSON Lines input; an error names the line.
fn read_jsonl(path: &Path, store: &mut dyn Store) -> Result<Vec<Item>> {
    crate::data::decode::check_regular_file(path)?;
    let text = std::fs::read_to_string(path).map_err(|e| StoreError::io(path, e))?;
    let base = path.parent().unwrap_or(Path::new("."));
    let mut lines = Vec::new();
    let mut names = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        if raw.trim().is_empty() {
            continue;
        }
        let error = |message: String| StoreError::Jsonl {
            path: path.to_path_buf(),
            line: i + 1,
            message,
        };
        let line: Line = serde_json::from_str(raw).map_err(|e| error(e.to_string()))?;
        let timestamp = match &line.timestamp {
            Some(t) => format_utc(parse_rfc3339(t).ok_or_else(|| {
                error(format!(
                    "timestamp {t:?} is not RFC 3339 (e.g. 2024-01-01T09:00:00Z)"
                ))
            })?),
            None => super::now_utc(),
        };
        match &line.label {
            Label::Index(v) if *v < 0 => {
                return Err(error(format!("label {v} is negative")));
            }
            Label::Name(n) if n.is_empty() => return Err(error("label is empty".into())),
            Label::Name(n) if !names.contains(n) => names.push(n.clone()),
            _ => {}
        }
        lines.push((line, timestamp));
    }
    let idx = store.ensure_classes(&names)?;
    Ok(lines
        .into_iter()
        .map(|(line, timestamp)| {
            let label = match line.label {
                Label::Index(v) => v,
                Label::Name(n) => names
                    .iter()
                    .position(|m| *m == n)
                    .map(|p| idx[p])
                    .unwrap_or_default(),
            };
            Item {
                path: if line.path.is_absolute() {
                    line.path
                } else {
                    base.join(line.path)
                },
                label,
                timestamp,
            }
        })
        .collect())
}

/// The outcome of reading one file.
pub struct Checked {
    pub sha256: Option<String>,
    pub status: SampleStatus,
    /// The kind of rejection, `None` when accepted.
    pub kind: Option<&'static str>,
}

/// Reads, hashes and strictly decodes one file (the rules every way in shares).
pub fn check_file(path: &Path) -> Checked {
    let bytes = match read_image_file(path) {
        Ok(bytes) => bytes,
        Err(e) => {
            return Checked {
                sha256: None,
                kind: Some(reason_kind(&e)),
                status: SampleStatus::Rejected(format!("{}: {e}", reason_kind(&e))),
            }
        }
    };
    let sha256 = Some(sha256_hex(&bytes));
    match decode_bytes(&bytes, path) {
        Ok(_) => Checked {
            sha256,
            status: SampleStatus::Accepted,
            kind: None,
        },
        Err(e) => Checked {
            sha256,
            kind: Some(reason_kind(&e)),
            status: SampleStatus::Rejected(format!("{}: {e}", reason_kind(&e))),
        },
    }
}

/// Runs the ingest into `store`; `stop` is checked between transactions.
pub fn ingest(
    store: &mut dyn Store,
    opts: &IngestOptions,
    stop: &dyn Fn() -> bool,
) -> Result<IngestSummary> {
    if opts.batch_size == 0 {
        return Err(StoreError::invalid("batch size", 0, "at least 1"));
    }
    let mut summary = IngestSummary::default();
    let items = match &opts.input {
        IngestInput::Folder(root) => {
            let folder = ImageFolder::scan(root)?;
            summary.scan_skipped = folder.skipped_summary();
            let idx = store.ensure_classes(&folder.classes)?;
            let now = super::now_utc();
            folder
                .items
                .iter()
                .map(|item| Item {
                    path: root.join(&item.path),
                    label: idx[item.target],
                    timestamp: now.clone(),
                })
                .collect()
        }
        IngestInput::Jsonl(path) => read_jsonl(path, store)?,
    };
    let mut seen: HashSet<String> = HashSet::new();
    // Files are read, hashed and decoded one chunk ahead of the database writes, so decoding
    // and committing overlap; into an empty store, as a bulk load.
    super::bulk_load(store, |store| {
        super::ahead::one_chunk_ahead(
            &items,
            opts.batch_size,
            |item| check_file(&item.path),
            |chunk, checked| -> Result<bool> {
                if stop() {
                    summary.stopped = true;
                    return Ok(false);
                }
                write_chunk(store, opts, chunk, checked, &mut seen, &mut summary)?;
                Ok(true)
            },
        )
    })?;
    Ok(summary)
}

/// The database side of [`ingest`]: one checked chunk, duplicates set aside, in one
/// transaction.
fn write_chunk(
    store: &mut dyn Store,
    opts: &IngestOptions,
    chunk: &[Item],
    checked: Vec<Checked>,
    seen: &mut HashSet<String>,
    summary: &mut IngestSummary,
) -> Result<()> {
    let hashes: Vec<String> = checked.iter().filter_map(|c| c.sha256.clone()).collect();
    let known = store.known_hashes(&hashes)?;
    let mut rows = Vec::new();
    let mut kinds = Vec::new();
    for (item, c) in chunk.iter().zip(checked) {
        if let Some(h) = &c.sha256 {
            if known.contains(h) || !seen.insert(h.clone()) {
                summary.duplicates += 1;
                summary.notes.push(Note::Duplicate {
                    path: item.path.clone(),
                });
                continue;
            }
        }
        let path = std::path::absolute(&item.path).unwrap_or_else(|_| item.path.clone());
        let key = match &c.sha256 {
            Some(h) => format!("content:{h}"),
            // No content to key on: the path and the time of this ingest.
            None => format!("unreadable:{}:{}", path.display(), unique_suffix()),
        };
        rows.push(NewSample {
            key,
            timestamp: item.timestamp.clone(),
            image_path: path.to_string_lossy().into_owned(),
            sha256: c.sha256,
            label_given: item.label,
            label_true: None,
            source: opts.source.clone(),
            split: Split::Train,
            status: c.status,
        });
        kinds.push((item.path.clone(), c.kind));
    }
    let ids = store.insert_samples(&rows)?;
    for ((id, row), (path, kind)) in ids.iter().zip(&rows).zip(kinds) {
        match (id, kind) {
            // Stored meanwhile by another ingest (same content key).
            (None, _) => {
                summary.duplicates += 1;
                summary.notes.push(Note::Duplicate { path });
            }
            (Some(_), None) => summary.accepted += 1,
            (Some(_), Some(kind)) => {
                *summary.rejected.entry(kind).or_default() += 1;
                summary.notes.push(Note::Rejected {
                    path,
                    reason: row.status.reason().unwrap_or_default().to_owned(),
                });
            }
        }
    }
    Ok(())
}

/// Nanoseconds since the epoch and the process id: distinct across ingests.
fn unique_suffix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{nanos}:{}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_line_groups_rejections() {
        let mut s = IngestSummary {
            accepted: 10,
            duplicates: 2,
            ..IngestSummary::default()
        };
        assert_eq!(s.line(), "accepted 10, duplicates 2, rejected 0");
        s.rejected.insert("undecodable", 2);
        s.rejected.insert("not_a_file", 1);
        assert_eq!(
            s.line(),
            "accepted 10, duplicates 2, rejected 3 (not_a_file 1, undecodable 2)"
        );
    }

    #[test]
    fn bad_files_are_classified() {
        let dir = tempfile::tempdir().unwrap();
        let text = dir.path().join("a.png");
        std::fs::write(&text, b"not an image").unwrap();
        let c = check_file(&text);
        assert_eq!(c.kind, Some("undecodable"));
        assert!(c.sha256.is_some());
        let missing = check_file(&dir.path().join("missing.png"));
        assert_eq!(missing.kind, Some("unreadable"));
        assert!(missing.sha256.is_none());
        assert!(check_file(dir.path()).kind == Some("not_a_file"));
    }
}
