//! Scanning an image folder `ROOT/<class>/**/<file>` into a list of labelled images.
//!
//! The rules, as torchvision's `ImageFolder` with `os.walk(followlinks=True)`, plus loop safety:
//! - every visible folder directly under the root is a class; files directly under the root
//!   (manifests, notes) are not part of the dataset;
//! - a class holds the image files anywhere below its folder, at any depth;
//! - names starting with `.` (files and folders) are invisible at every level;
//! - symbolic links are followed, to files and to folders; paths are recorded through the link
//!   names, relative to the root. A link to a folder that is already on the current path (an
//!   ancestor, or the root) is not followed and is reported as a [`SkipReason::SymlinkLoop`];
//!   a link to a folder elsewhere is followed, so its images are listed under both names;
//! - classes are sorted by name; the items of a class by their relative path (component by
//!   component, so `cat/a/x.png` comes before `cat/b.png`, where torchvision lists a folder's
//!   files before its sub-folders');
//! - everything else under a class folder that is not taken is recorded in
//!   [`ImageFolder::skipped`] with a [`SkipReason`].

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
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

/// Why an entry below a class folder is not an image of the dataset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SkipReason {
    /// A file whose extension is not one of [`IMAGE_EXTENSIONS`].
    UnsupportedExtension,
    /// A symbolic link to a folder that is already on the path being scanned.
    SymlinkLoop,
    /// A name that is not valid UTF-8 (manifests could not record it).
    InvalidName,
    /// Neither a file nor a folder (a socket, a pipe, a device).
    NotAFile,
    /// The entry could not be inspected or the folder listed (a broken link, no permission);
    /// the message is the operating system's.
    Unreadable(String),
}

impl SkipReason {
    /// The reason without its details, as counted by [`ImageFolder::skipped_summary`].
    pub fn kind(&self) -> &'static str {
        match self {
            Self::UnsupportedExtension => "unsupported extension",
            Self::SymlinkLoop => "symlink loop",
            Self::InvalidName => "name not UTF-8",
            Self::NotAFile => "not a file or folder",
            Self::Unreadable(_) => "unreadable",
        }
    }
}

impl fmt::Display for SkipReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unreadable(message) => write!(f, "unreadable: {message}"),
            other => f.write_str(other.kind()),
        }
    }
}

/// An entry below a class folder that was not taken: its path relative to the dataset root
/// (through link names), its class index and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedEntry {
    pub path: PathBuf,
    pub target: usize,
    pub reason: SkipReason,
}

/// How many entries of one class were skipped for one kind of reason ([`SkipReason::kind`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkipCount {
    pub class: String,
    pub reason: &'static str,
    pub count: usize,
}

/// An image folder: class names (sorted; the class index is the position here), the images,
/// ordered by class, then by relative path, and the entries that were skipped, in the same order.
#[derive(Debug, Clone)]
pub struct ImageFolder {
    pub root: PathBuf,
    pub classes: Vec<String>,
    pub items: Vec<ImageItem>,
    /// Entries below class folders that are not images of the dataset, with the reason
    /// (hidden names are not listed: they are invisible by design).
    pub skipped: Vec<SkippedEntry>,
}

/// True when `path` has one of [`IMAGE_EXTENSIONS`] (any case).
pub fn is_image_file(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| x.eq_ignore_ascii_case(e)))
}

fn is_hidden(name: &OsString) -> bool {
    name.as_encoded_bytes().starts_with(b".")
}

/// What a folder entry is, links followed.
enum Kind {
    Dir,
    File,
    Other,
}

/// A visible folder entry; `kind` is an error when the entry cannot be inspected (a broken
/// link, no permission).
struct Entry {
    name: OsString,
    path: PathBuf,
    kind: std::io::Result<Kind>,
}

/// The visible entries of a folder, sorted by name (byte order).
fn visible_entries(dir: &Path) -> std::io::Result<Vec<Entry>> {
    let mut entries = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        if is_hidden(&name) {
            continue;
        }
        let path = entry.path();
        let kind_of = |t: std::fs::FileType| {
            if t.is_dir() {
                Kind::Dir
            } else if t.is_file() {
                Kind::File
            } else {
                Kind::Other
            }
        };
        // The entry's own type comes with the listing (no system call per file); a link is
        // followed with `fs::metadata`, so linked folders and images work.
        let kind = match entry.file_type() {
            Ok(t) if !t.is_symlink() => Ok(kind_of(t)),
            _ => std::fs::metadata(&path).map(|m| kind_of(m.file_type())),
        };
        entries.push(Entry { name, path, kind });
    }
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(entries)
}

/// The walk below one class folder.
struct ClassWalk<'a> {
    target: usize,
    items: &'a mut Vec<ImageItem>,
    skipped: &'a mut Vec<SkippedEntry>,
    /// Canonical paths of the root and of the folders from the class folder down to the one
    /// being listed: a link back to any of them would recurse forever.
    ancestors: Vec<PathBuf>,
}

impl ClassWalk<'_> {
    fn skip(&mut self, path: PathBuf, reason: SkipReason) {
        self.skipped.push(SkippedEntry {
            path,
            target: self.target,
            reason,
        });
    }

    /// Takes the images among `entries` (of the folder at `rel`) and walks the sub-folders.
    /// Entries come sorted by name, so items come out sorted by relative path.
    fn visit(&mut self, rel: &Path, entries: Vec<Entry>) {
        for entry in entries {
            let rel = rel.join(&entry.name);
            if entry.name.to_str().is_none() {
                self.skip(rel, SkipReason::InvalidName);
                continue;
            }
            match entry.kind {
                Err(e) => self.skip(rel, SkipReason::Unreadable(e.to_string())),
                Ok(Kind::Other) => self.skip(rel, SkipReason::NotAFile),
                Ok(Kind::File) if is_image_file(&entry.path) => self.items.push(ImageItem {
                    path: rel,
                    target: self.target,
                }),
                Ok(Kind::File) => self.skip(rel, SkipReason::UnsupportedExtension),
                Ok(Kind::Dir) => self.enter(&entry.path, rel),
            }
        }
    }

    /// Walks the sub-folder at `path` (`rel` relative to the root) unless it closes a loop.
    fn enter(&mut self, path: &Path, rel: PathBuf) {
        let canonical = match std::fs::canonicalize(path) {
            Ok(c) => c,
            Err(e) => return self.skip(rel, SkipReason::Unreadable(e.to_string())),
        };
        if self.ancestors.contains(&canonical) {
            return self.skip(rel, SkipReason::SymlinkLoop);
        }
        match visible_entries(path) {
            Ok(entries) => {
                self.ancestors.push(canonical);
                self.visit(&rel, entries);
                self.ancestors.pop();
            }
            Err(e) => self.skip(rel, SkipReason::Unreadable(e.to_string())),
        }
    }
}

impl ImageFolder {
    /// Scans `root` by the rules of this module: every visible sub-folder is a class, every
    /// visible image file below it, at any depth, is an item of that class.
    ///
    /// Fails when the root is missing or not a folder, holds no class folder, a class folder
    /// cannot be listed, or a class holds no image at all. Problems below a class folder do
    /// not fail the scan; they are recorded in [`ImageFolder::skipped`].
    pub fn scan(root: &Path) -> Result<Self> {
        if !root.exists() {
            return Err(DataError::MissingRoot(root.to_path_buf()));
        }
        if !root.is_dir() {
            return Err(DataError::NotADirectory(root.to_path_buf()));
        }
        let root_canonical = std::fs::canonicalize(root).map_err(|e| DataError::io(root, e))?;
        let mut class_dirs = Vec::new();
        for entry in visible_entries(root).map_err(|e| DataError::io(root, e))? {
            match entry.kind.map_err(|e| DataError::io(&entry.path, e))? {
                Kind::Dir => {}
                Kind::File | Kind::Other => continue,
            }
            let Some(name) = entry.name.to_str().map(str::to_owned) else {
                return Err(DataError::invalid(
                    "class folder name",
                    entry.path.display(),
                    "names must be valid UTF-8",
                ));
            };
            class_dirs.push((name, entry.path));
        }
        if class_dirs.is_empty() {
            return Err(DataError::NoClasses(root.to_path_buf()));
        }
        let mut classes = Vec::with_capacity(class_dirs.len());
        let mut items = Vec::new();
        let mut skipped = Vec::new();
        for (target, (name, dir)) in class_dirs.into_iter().enumerate() {
            let canonical = std::fs::canonicalize(&dir).map_err(|e| DataError::io(&dir, e))?;
            if root_canonical.starts_with(&canonical) {
                return Err(DataError::invalid(
                    "class folder",
                    dir.display(),
                    "a folder, not a link to the dataset folder or above it (a symlink loop)",
                ));
            }
            let entries = visible_entries(&dir).map_err(|e| DataError::io(&dir, e))?;
            let before = items.len();
            ClassWalk {
                target,
                items: &mut items,
                skipped: &mut skipped,
                ancestors: vec![root_canonical.clone(), canonical],
            }
            .visit(Path::new(&name), entries);
            if items.len() == before {
                return Err(DataError::EmptyClass(dir));
            }
            classes.push(name);
        }
        Ok(Self {
            root: root.to_path_buf(),
            classes,
            items,
            skipped,
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

    /// Files below class folders skipped because their extension is not an image's.
    pub fn ignored_files(&self) -> usize {
        self.skipped
            .iter()
            .filter(|s| s.reason == SkipReason::UnsupportedExtension)
            .count()
    }

    /// Skipped entries counted per class and kind of reason, ordered by class index, then
    /// reason; only non-zero counts are listed.
    pub fn skipped_summary(&self) -> Vec<SkipCount> {
        let mut counts: BTreeMap<(usize, &'static str), usize> = BTreeMap::new();
        for s in &self.skipped {
            *counts.entry((s.target, s.reason.kind())).or_default() += 1;
        }
        counts
            .into_iter()
            .map(|((target, reason), count)| SkipCount {
                class: self.classes[target].clone(),
                reason,
                count,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(path: &Path) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, b"x").unwrap();
    }

    fn item_list(folder: &ImageFolder) -> Vec<(String, usize)> {
        folder
            .items
            .iter()
            .map(|i| (i.path.to_str().unwrap().to_owned(), i.target))
            .collect()
    }

    fn skip_list(folder: &ImageFolder) -> Vec<(String, usize, String)> {
        folder
            .skipped
            .iter()
            .map(|s| {
                let reason = s.reason.kind().to_owned();
                (s.path.to_str().unwrap().to_owned(), s.target, reason)
            })
            .collect()
    }

    fn owned(v: &[(&str, usize)]) -> Vec<(String, usize)> {
        v.iter().map(|(p, t)| (p.to_string(), *t)).collect()
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
        assert_eq!(folder.ignored_files(), 1);
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

    #[test]
    fn nested_folders_belong_to_their_top_level_class_in_path_order() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for f in [
            "cat/z.png",
            "cat/a.png",
            "cat/sub/b.jpg",
            "cat/sub/deeper/c.png",
            "cat/sub/deeper/d.txt",
            "dog/x/y/z/w.bmp",
            "dog/m-n.png",
            "dog/m/o.png",
            "dog/a.gif",
            // Hidden at every depth: neither items nor reported.
            "cat/sub/.hidden/e.png",
            "cat/sub/deeper/.f.png",
            "dog/.git/objects/h.png",
            "dog/x/.y/i.png",
            // Only in a sub-folder: still an image of its class.
            "owl/2024/05/p.webp",
        ] {
            touch(&root.join(f));
        }
        let folder = ImageFolder::scan(root).unwrap();
        assert_eq!(folder.classes, vec!["cat", "dog", "owl"]);
        assert_eq!(
            item_list(&folder),
            owned(&[
                ("cat/a.png", 0),
                ("cat/sub/b.jpg", 0),
                ("cat/sub/deeper/c.png", 0),
                ("cat/z.png", 0),
                ("dog/a.gif", 1),
                ("dog/m/o.png", 1),
                ("dog/m-n.png", 1),
                ("dog/x/y/z/w.bmp", 1),
                ("owl/2024/05/p.webp", 2),
            ])
        );
        assert_eq!(
            skip_list(&folder),
            vec![(
                "cat/sub/deeper/d.txt".to_owned(),
                0,
                "unsupported extension".to_owned()
            )]
        );
        assert_eq!(folder.class_counts(), vec![4, 4, 1]);
        assert_eq!(folder.ignored_files(), 1);
        // The same tree scans to the same lists.
        assert_eq!(ImageFolder::scan(root).unwrap().items, folder.items);
    }

    #[test]
    fn unsupported_extensions_are_reported_per_class() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for f in [
            "cat/a.png",
            "cat/notes.txt",
            "cat/raw/b.tiff",
            "dog/c.jpg",
            "dog/d.csv",
            "emu/e.bmp",
        ] {
            touch(&root.join(f));
        }
        let folder = ImageFolder::scan(root).unwrap();
        assert_eq!(
            skip_list(&folder),
            vec![
                (
                    "cat/notes.txt".to_owned(),
                    0,
                    "unsupported extension".to_owned()
                ),
                (
                    "cat/raw/b.tiff".to_owned(),
                    0,
                    "unsupported extension".to_owned()
                ),
                (
                    "dog/d.csv".to_owned(),
                    1,
                    "unsupported extension".to_owned()
                ),
            ]
        );
        assert_eq!(
            folder.skipped_summary(),
            vec![
                SkipCount {
                    class: "cat".into(),
                    reason: "unsupported extension",
                    count: 2
                },
                SkipCount {
                    class: "dog".into(),
                    reason: "unsupported extension",
                    count: 1
                },
            ]
        );
        assert_eq!(folder.ignored_files(), 3);
        assert_eq!(
            SkipReason::Unreadable("Permission denied".into()).to_string(),
            "unreadable: Permission denied"
        );
        assert_eq!(SkipReason::SymlinkLoop.to_string(), "symlink loop");
    }

    #[cfg(unix)]
    #[test]
    fn symlinks_are_followed_through_their_names_and_loops_stop() {
        use std::os::unix::fs::symlink;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        touch(&root.join("cat/real/a.png"));
        touch(&root.join("dog/b.png"));
        std::fs::create_dir_all(root.join("dog/deep")).unwrap();
        // A linked folder and a linked file inside a class.
        symlink("../cat/real", root.join("dog/linked")).unwrap();
        symlink("../cat/real/a.png", root.join("dog/pic.png")).unwrap();
        // Links back to an ancestor: the class folder itself, and the dataset root.
        symlink(".", root.join("dog/loop")).unwrap();
        symlink(root, root.join("dog/deep/up")).unwrap();
        // A broken link.
        symlink("missing.png", root.join("dog/broken.png")).unwrap();
        // A linked class folder.
        symlink("cat", root.join("bird")).unwrap();

        let folder = ImageFolder::scan(root).unwrap();
        assert_eq!(folder.classes, vec!["bird", "cat", "dog"]);
        assert_eq!(
            item_list(&folder),
            owned(&[
                ("bird/real/a.png", 0),
                ("cat/real/a.png", 1),
                ("dog/b.png", 2),
                ("dog/linked/a.png", 2),
                ("dog/pic.png", 2),
            ])
        );
        assert_eq!(
            skip_list(&folder),
            vec![
                ("dog/broken.png".to_owned(), 2, "unreadable".to_owned()),
                ("dog/deep/up".to_owned(), 2, "symlink loop".to_owned()),
                ("dog/loop".to_owned(), 2, "symlink loop".to_owned()),
            ]
        );
        assert!(
            matches!(&folder.skipped[0].reason, SkipReason::Unreadable(m) if m.contains("No such file")),
            "{:?}",
            folder.skipped[0]
        );
        assert_eq!(
            folder.skipped_summary(),
            vec![
                SkipCount {
                    class: "dog".into(),
                    reason: "symlink loop",
                    count: 2
                },
                SkipCount {
                    class: "dog".into(),
                    reason: "unreadable",
                    count: 1
                },
            ]
        );
        assert_eq!(folder.ignored_files(), 0);

        // A class folder that is a link to the root itself is refused, not walked.
        symlink(".", root.join("all")).unwrap();
        let err = ImageFolder::scan(root).unwrap_err().to_string();
        assert!(err.contains("all") && err.contains("symlink loop"), "{err}");
    }

    #[cfg(unix)]
    #[test]
    fn names_that_are_not_utf8_are_reported() {
        use std::os::unix::ffi::OsStrExt;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        touch(&root.join("cat/a.png"));
        let bad = std::ffi::OsStr::from_bytes(b"\xffb.png");
        touch(&root.join("cat").join(bad));
        let folder = ImageFolder::scan(root).unwrap();
        assert_eq!(item_list(&folder), owned(&[("cat/a.png", 0)]));
        assert_eq!(folder.skipped.len(), 1);
        assert_eq!(folder.skipped[0].path, Path::new("cat").join(bad));
        assert_eq!(folder.skipped[0].reason, SkipReason::InvalidName);
    }
}
