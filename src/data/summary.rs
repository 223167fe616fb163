//! What `bccp info` shows: the images per class of an image folder, or per class and day of a
//! prepared Monday/Tuesday dataset.

use std::path::Path;

use super::error::Result;
use super::prepare::{read_dataset_info, DatasetInfo, DATASET_INFO_FILE};
use super::{read_manifest_for, ImageFolder, Record};

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

/// Records per class.
fn count(records: &[Record], classes: usize) -> Vec<usize> {
    let mut counts = vec![0; classes];
    for r in records {
        counts[r.target] += 1;
    }
    counts
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
        let monday = count(&read_manifest_for(&days[0], k)?, k);
        let tuesday = count(&read_manifest_for(&days[1], k)?, k);
        Ok(Self::Prepared {
            info,
            per_class: monday.into_iter().zip(tuesday).collect(),
        })
    }
}
