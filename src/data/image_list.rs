//! A list of images to embed: files, their labels and the paths to record, from an image
//! folder, a JSON Lines manifest or manifest records.

use std::path::{Path, PathBuf};

use super::error::Result;
use super::{read_manifest, ImageFolder, Record, SkipCount};

/// Images to embed: absolute paths, labels, and the paths to record (relative to the dataset).
#[derive(Debug, Clone, Default)]
pub struct ImageList {
    pub files: Vec<PathBuf>,
    pub recorded_paths: Vec<String>,
    pub targets: Vec<i64>,
    /// Manifest ids, when the list came from a manifest.
    pub ids: Option<Vec<i64>>,
    pub classes: Vec<String>,
    /// What the folder scan skipped, per class and reason (empty for manifests).
    pub skipped: Vec<SkipCount>,
}

impl ImageList {
    /// All images of an image folder, in scan order.
    pub fn from_folder(root: &Path) -> Result<Self> {
        let folder = ImageFolder::scan(root)?;
        Ok(Self {
            files: folder.items.iter().map(|i| root.join(&i.path)).collect(),
            recorded_paths: folder
                .items
                .iter()
                .map(|i| i.path.to_string_lossy().replace('\\', "/"))
                .collect(),
            targets: folder.items.iter().map(|i| i.target as i64).collect(),
            ids: None,
            skipped: folder.skipped_summary(),
            classes: folder.classes,
        })
    }

    /// Manifest records whose image paths are relative to `root`.
    pub fn from_records(root: &Path, records: &[Record], classes: &[String]) -> Self {
        Self {
            files: records.iter().map(|r| root.join(&r.image_path)).collect(),
            recorded_paths: records.iter().map(|r| r.image_path.clone()).collect(),
            targets: records.iter().map(|r| r.target as i64).collect(),
            ids: Some(records.iter().map(|r| r.id as i64).collect()),
            classes: classes.to_vec(),
            skipped: Vec::new(),
        }
    }

    /// The records of a JSON Lines manifest; image paths are relative to the manifest's folder,
    /// class names come from `dataset.json` beside it when present.
    pub fn from_manifest(path: &Path) -> Result<Self> {
        let root = path.parent().unwrap_or(Path::new("."));
        let classes = super::prepare::read_dataset_info(root)
            .map(|i| i.classes)
            .unwrap_or_default();
        let records = if classes.is_empty() {
            read_manifest(path)?
        } else {
            super::read_manifest_for(path, classes.len())?
        };
        Ok(Self::from_records(root, &records, &classes))
    }

    /// A folder or a `.jsonl` manifest.
    pub fn from_path(path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Self::from_folder(path);
        }
        let manifest = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| e.eq_ignore_ascii_case("jsonl") || e.eq_ignore_ascii_case("json"));
        if !manifest {
            return Err(super::DataError::invalid(
                "image list",
                path.display(),
                "expected an image folder ROOT/<class>/<image> or a JSON Lines manifest (.jsonl), not a single file",
            ));
        }
        Self::from_manifest(path)
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.files.len()
    }

    /// True when the list holds no image.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// SHA-256 (hex) of the list as recorded: every image's recorded path, target and manifest
    /// id, in order. Shards of one list share it; embedding files carry it so that parts of
    /// different lists are never merged.
    pub fn fingerprint(&self) -> String {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        for (i, (path, target)) in self.recorded_paths.iter().zip(&self.targets).enumerate() {
            let id = self.ids.as_ref().and_then(|ids| ids.get(i)).copied();
            h.update(format!("{path}\0{target}\0{id:?}\n").as_bytes());
        }
        format!("{:x}", h.finalize())
    }

    /// The images `range` of the list (for one shard), with the same classes.
    pub fn slice(&self, range: std::ops::Range<usize>) -> Self {
        Self {
            files: self.files[range.clone()].to_vec(),
            recorded_paths: self.recorded_paths[range.clone()].to_vec(),
            targets: self.targets[range.clone()].to_vec(),
            ids: self.ids.as_ref().map(|ids| ids[range].to_vec()),
            classes: self.classes.clone(),
            skipped: self.skipped.clone(),
        }
    }
}
