//! What `bccp info` shows: the images per class of an image folder, or per class and day of a
//! prepared Monday/Tuesday dataset.

use std::path::Path;

use super::error::{DataError, Result};
use super::prepare::{read_dataset_info, DatasetInfo, DATASET_INFO_FILE};
use super::{read_manifest, ImageFolder, Record};

/// Images per class of a dataset.
#[derive(Debug, Clone)]
pub enum DatasetSummary {
    /// A folder made by `bccp prepare`: its settings and (Monday, Tuesday) counts per class.
    Prepared {
        info: DatasetInfo,
        per_class: Vec<(usize, usize)>,
    },
    /// A plain image folder: its scan and the images per class.
    Folder {
        folder: ImageFolder,
        per_class: Vec<usize>,
    },
}

/// Counts `records` per class; a target outside the class list is an error naming the
/// manifest and the record.
fn count(records: &[Record], classes: usize, manifest: &Path) -> Result<Vec<usize>> {
    let mut counts = vec![0; classes];
    for (i, r) in records.iter().enumerate() {
        let slot = counts
            .get_mut(r.target)
            .ok_or_else(|| DataError::Manifest {
                path: manifest.to_path_buf(),
                line: i + 1,
                message: format!(
                    "record {} has target {} but the dataset has {classes} classes",
                    r.id, r.target
                ),
            })?;
        *slot += 1;
    }
    Ok(counts)
}

impl DatasetSummary {
    /// Summarises `dir`: a prepared dataset when it holds `dataset.json`, else an image folder.
    pub fn of(dir: &Path) -> Result<Self> {
        if !dir.join(DATASET_INFO_FILE).is_file() {
            let folder = ImageFolder::scan(dir)?;
            let per_class = folder.class_counts();
            return Ok(Self::Folder { folder, per_class });
        }
        let info = read_dataset_info(dir)?;
        let k = info.classes.len();
        let days = ["monday.jsonl", "tuesday.jsonl"].map(|f| dir.join(f));
        let monday = count(&read_manifest(&days[0])?, k, &days[0])?;
        let tuesday = count(&read_manifest(&days[1])?, k, &days[1])?;
        Ok(Self::Prepared {
            info,
            per_class: monday.into_iter().zip(tuesday).collect(),
        })
    }
}
