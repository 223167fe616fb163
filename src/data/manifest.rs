//! The JSON Lines manifest: one record per image, as the reference's data generator stored it.

use std::collections::HashSet;
use std::path::{Component, Path};

use serde::{Deserialize, Serialize};

use super::error::{DataError, Result};
use super::timestamp::is_rfc3339;

/// The day an image arrived: Monday data is clean, Tuesday data is corrupted.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Day {
    #[default]
    Monday,
    Tuesday,
}

impl Day {
    /// The lowercase name used in manifests and folder names.
    pub fn as_str(self) -> &'static str {
        match self {
            Day::Monday => "monday",
            Day::Tuesday => "tuesday",
        }
    }
}

/// One image of a day's data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    /// 1-based, stable across runs; Tuesday's ids continue after Monday's.
    pub id: u64,
    /// RFC 3339 arrival time.
    pub timestamp: String,
    /// Path relative to the dataset root, with `/` separators.
    pub image_path: String,
    /// Class index (position in the sorted class names).
    pub target: usize,
    pub day: Day,
    /// For a corrupted image, the path of its clean original (relative to the dataset root).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_path: Option<String>,
    /// Hex SHA-256 of the image file as `bccp prepare` wrote it (manifests of older versions
    /// have none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

fn check_relative(path: &str) -> std::result::Result<(), String> {
    let p = Path::new(path);
    if path.is_empty() {
        return Err("image_path is empty".into());
    }
    if p.is_absolute() || p.components().any(|c| !matches!(c, Component::Normal(_))) {
        return Err(format!(
            "image_path {path:?} must be relative to the dataset root, without '..'"
        ));
    }
    Ok(())
}

impl Record {
    fn validate(&self) -> std::result::Result<(), String> {
        if self.id == 0 {
            return Err("id must be 1 or more".into());
        }
        if !is_rfc3339(&self.timestamp) {
            return Err(format!(
                "timestamp {:?} is not RFC 3339 (e.g. 2024-01-01T09:00:00Z)",
                self.timestamp
            ));
        }
        check_relative(&self.image_path)?;
        if let Some(original) = &self.original_path {
            check_relative(original)?;
        }
        Ok(())
    }
}

/// Serialises records as JSON Lines.
pub fn to_jsonl(records: &[Record]) -> String {
    let mut out = String::new();
    for record in records {
        // A Record holds only strings and integers, so serialisation cannot fail.
        out.push_str(&serde_json::to_string(record).expect("record serialises"));
        out.push('\n');
    }
    out
}

/// Writes a manifest atomically (temporary file, then rename).
pub fn write_manifest(path: &Path, records: &[Record]) -> Result<()> {
    crate::fsutil::write_atomic(path, to_jsonl(records).as_bytes())
        .map_err(|e| DataError::io(path, e))
}

/// Parses JSON Lines text; `path` is only used in error messages. Blank lines are skipped.
/// Ids must be unique.
pub fn parse_manifest(text: &str, path: &Path) -> Result<Vec<Record>> {
    let mut records = Vec::new();
    let mut ids = HashSet::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let error = |message: String| DataError::Manifest {
            path: path.to_path_buf(),
            line: i + 1,
            message,
        };
        let record: Record = serde_json::from_str(line).map_err(|e| error(e.to_string()))?;
        record.validate().map_err(error)?;
        if !ids.insert(record.id) {
            return Err(error(format!("duplicate id {}", record.id)));
        }
        records.push(record);
    }
    Ok(records)
}

/// Reads a manifest file.
pub fn read_manifest(path: &Path) -> Result<Vec<Record>> {
    // A FIFO would block the read forever.
    super::decode::check_regular_file(path)?;
    let text = std::fs::read_to_string(path).map_err(|e| DataError::io(path, e))?;
    parse_manifest(&text, path)
}

/// Reads a manifest of a dataset with `classes` classes: every record's target must name one
/// of them (an error names the manifest, the line and the record otherwise), so a bad target
/// is refused when the dataset is opened, before any work.
pub fn read_manifest_for(path: &Path, classes: usize) -> Result<Vec<Record>> {
    let text = std::fs::read_to_string(path).map_err(|e| DataError::io(path, e))?;
    let records = parse_manifest(&text, path)?;
    let lines = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, _)| i + 1);
    for (r, line) in records.iter().zip(lines) {
        if r.target >= classes {
            return Err(DataError::Manifest {
                path: path.to_path_buf(),
                line,
                message: format!(
                    "record {} has target {} but the dataset has {classes} classes (0..{})",
                    r.id,
                    r.target,
                    classes.saturating_sub(1)
                ),
            });
        }
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: u64, day: Day) -> Record {
        Record {
            id,
            timestamp: "2024-01-01T00:00:01Z".into(),
            image_path: format!("{}/cat/{id}.png", day.as_str()),
            target: 3,
            day,
            original_path: (day == Day::Tuesday).then(|| format!("tuesday_original/cat/{id}.png")),
            sha256: id.is_multiple_of(2).then(|| format!("{id:064x}")),
        }
    }

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.jsonl");
        let records = vec![record(1, Day::Monday), record(2, Day::Tuesday)];
        write_manifest(&path, &records).unwrap();
        assert_eq!(read_manifest(&path).unwrap(), records);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            text.lines().next().unwrap(),
            r#"{"id":1,"timestamp":"2024-01-01T00:00:01Z","image_path":"monday/cat/1.png","target":3,"day":"monday"}"#
        );
    }

    #[test]
    fn malformed_lines_are_named() {
        let good = to_jsonl(&[record(1, Day::Monday)]);
        let cases = [
            ("{not json}\n", 2, "key must be a string"),
            (
                r#"{"id":2,"timestamp":"2024-01-01T00:00:01Z","image_path":"a.png","target":0,"day":"friday"}"#,
                2,
                "unknown variant",
            ),
            (
                r#"{"id":2,"timestamp":"soon","image_path":"a.png","target":0,"day":"monday"}"#,
                2,
                "RFC 3339",
            ),
            (
                r#"{"id":2,"timestamp":"2024-01-01T00:00:01Z","image_path":"../a.png","target":0,"day":"monday"}"#,
                2,
                "relative",
            ),
            (
                r#"{"id":1,"timestamp":"2024-01-01T00:00:01Z","image_path":"a.png","target":0,"day":"monday"}"#,
                2,
                "duplicate id 1",
            ),
            (
                r#"{"id":2,"timestamp":"2024-01-01T00:00:01Z","target":0,"day":"monday"}"#,
                2,
                "missing field `image_path`",
            ),
        ];
        for (bad, line, needle) in cases {
            let text = format!("{good}{bad}\n");
            let err = parse_manifest(&text, Path::new("x.jsonl"))
                .unwrap_err()
                .to_string();
            assert!(err.starts_with(&format!("x.jsonl, line {line}:")), "{err}");
            assert!(err.contains(needle), "{err} should mention {needle}");
        }
    }
}
