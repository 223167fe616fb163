//! Scanning an image folder `ROOT/<class>/<file>` into a list of labelled images.

use std::path::{Path, PathBuf};

use super::error::{DataError, Result};

/// File extensions accepted as images (compared case-insensitively).
pub const IMAGE_EXTENSIONS: [&str; 6] = ["png", "jpg", "jpeg", "gif", "bmp", "webp"];

/// One image of a dataset: its path relative to the dataset root and its class index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageItem {
    pub path: PathBuf,
    pub target: usize,
}

/// An image folder: class names (sorted; the class index is the position here) and the images,
/// ordered by class, then by file name.
#[derive(Debug, Clone)]
pub struct ImageFolder {
    pub root: PathBuf,
    pub classes: Vec<String>,
    pub items: Vec<ImageItem>,
    /// Files in class folders whose extension is not an image extension (they are skipped).
    pub ignored_files: usize,
}

/// True when `path` has one of [`IMAGE_EXTENSIONS`] (any case).
pub fn is_image_file(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| x.eq_ignore_ascii_case(e)))
}

fn is_hidden(name: &str) -> bool {
    name.starts_with('.')
}

/// Sorted, visible entries of a folder as (file name, full path, is_dir).
fn visible_entries(dir: &Path) -> Result<Vec<(String, PathBuf, bool)>> {
    let reader = std::fs::read_dir(dir).map_err(|e| DataError::io(dir, e))?;
    let mut entries = Vec::new();
    for entry in reader {
        let entry = entry.map_err(|e| DataError::io(dir, e))?;
        let path = entry.path();
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            return Err(DataError::invalid(
                "file name",
                path.display(),
                "names must be valid UTF-8",
            ));
        };
        if is_hidden(&name) {
            continue;
        }
        // Follow symlinks so linked class folders and images work.
        let is_dir = std::fs::metadata(&path)
            .map_err(|e| DataError::io(&path, e))?
            .is_dir();
        entries.push((name, path, is_dir));
    }
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(entries)
}

impl ImageFolder {
    /// Scans `root`: every visible sub-folder is a class; every visible image file in it is an
    /// item. Files directly under `root` (manifests, notes) are ignored.
    pub fn scan(root: &Path) -> Result<Self> {
        if !root.exists() {
            return Err(DataError::MissingRoot(root.to_path_buf()));
        }
        if !root.is_dir() {
            return Err(DataError::NotADirectory(root.to_path_buf()));
        }
        let class_dirs: Vec<_> = visible_entries(root)?
            .into_iter()
            .filter(|(_, _, is_dir)| *is_dir)
            .collect();
        if class_dirs.is_empty() {
            return Err(DataError::NoClasses(root.to_path_buf()));
        }
        let mut classes = Vec::with_capacity(class_dirs.len());
        let mut items = Vec::new();
        let mut ignored_files = 0;
        for (target, (name, dir, _)) in class_dirs.into_iter().enumerate() {
            let before = items.len();
            for (file, path, is_dir) in visible_entries(&dir)? {
                if is_dir {
                    continue;
                }
                if is_image_file(&path) {
                    items.push(ImageItem {
                        path: Path::new(&name).join(file),
                        target,
                    });
                } else {
                    ignored_files += 1;
                }
            }
            if items.len() == before {
                return Err(DataError::EmptyClass(dir));
            }
            classes.push(name);
        }
        Ok(Self {
            root: root.to_path_buf(),
            classes,
            items,
            ignored_files,
        })
    }

    /// Number of images per class, indexed by class.
    pub fn class_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.classes.len()];
        for item in &self.items {
            counts[item.target] += 1;
        }
        counts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(path: &Path) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, b"x").unwrap();
    }

    #[test]
    fn classes_sorted_hidden_and_other_files_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        touch(&root.join("zebra/b.PNG"));
        touch(&root.join("zebra/a.jpeg"));
        touch(&root.join("ant/x.webp"));
        touch(&root.join("ant/.hidden.png"));
        touch(&root.join("ant/notes.txt"));
        touch(&root.join(".cache/y.png"));
        touch(&root.join("manifest.jsonl"));
        let folder = ImageFolder::scan(root).unwrap();
        assert_eq!(folder.classes, vec!["ant", "zebra"]);
        let got: Vec<_> = folder
            .items
            .iter()
            .map(|i| (i.path.to_str().unwrap().to_owned(), i.target))
            .collect();
        assert_eq!(
            got,
            vec![
                ("ant/x.webp".to_owned(), 0),
                ("zebra/a.jpeg".to_owned(), 1),
                ("zebra/b.PNG".to_owned(), 1)
            ]
        );
        assert_eq!(folder.ignored_files, 1);
        assert_eq!(folder.class_counts(), vec![1, 2]);
    }

    #[test]
    fn clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        let err = ImageFolder::scan(&missing).unwrap_err().to_string();
        assert!(
            err.contains("does not exist") && err.contains("nope"),
            "{err}"
        );

        let err = ImageFolder::scan(dir.path()).unwrap_err().to_string();
        assert!(err.contains("no class folders"), "{err}");

        touch(&dir.path().join("cat/readme.txt"));
        let err = ImageFolder::scan(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("holds no images") && err.contains("cat"),
            "{err}"
        );
    }
}
