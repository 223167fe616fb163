//! Writing outputs so that they are never half-written: files go to a temporary sibling and
//! are renamed into place; folders are built in a staging sibling and renamed when complete.

use std::io;
use std::path::{Path, PathBuf};

/// A temporary sibling of `target`, unique to this process.
fn temp_sibling(target: &Path, tag: &str) -> PathBuf {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".to_owned());
    let sibling = format!(".{name}.{tag}-{}", std::process::id());
    match target.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.join(sibling),
        _ => PathBuf::from(sibling),
    }
}

/// Writes `bytes` to `path` through a temporary file and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = temp_sibling(path, "tmp");
    let result = std::fs::write(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, path));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// True when `dir` does not exist or is an empty folder.
pub fn is_absent_or_empty(dir: &Path) -> io::Result<bool> {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => Ok(entries.next().is_none()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(true),
        Err(e) => Err(e),
    }
}

/// A folder under construction. It is created as a hidden sibling of the target; `commit`
/// moves it into place, and dropping it without `commit` removes it, so a failed run leaves
/// nothing behind.
#[derive(Debug)]
pub struct StagedDir {
    staging: PathBuf,
    target: PathBuf,
    committed: bool,
}

impl StagedDir {
    /// Creates the staging folder for `target` (whose parent is created if needed).
    pub fn create(target: &Path) -> io::Result<Self> {
        if let Some(parent) = target.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)?;
        }
        let staging = temp_sibling(target, "staging");
        if staging.exists() {
            std::fs::remove_dir_all(&staging)?;
        }
        std::fs::create_dir(&staging)?;
        Ok(Self {
            staging,
            target: target.to_path_buf(),
            committed: false,
        })
    }

    /// The folder to write into.
    pub fn path(&self) -> &Path {
        &self.staging
    }

    /// Moves the finished folder to the target, replacing whatever was there.
    pub fn commit(mut self) -> io::Result<()> {
        if self.target.exists() {
            // Move the old output aside first so the target is never missing a complete copy
            // for longer than two renames.
            let old = temp_sibling(&self.target, "old");
            std::fs::rename(&self.target, &old)?;
            if let Err(e) = std::fs::rename(&self.staging, &self.target) {
                let _ = std::fs::rename(&old, &self.target);
                return Err(e);
            }
            let _ = std::fs::remove_dir_all(&old);
        } else {
            std::fs::rename(&self.staging, &self.target)?;
        }
        self.committed = true;
        Ok(())
    }
}

impl Drop for StagedDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.staging);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staged_dir_commits_or_vanishes() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out");
        {
            let staged = StagedDir::create(&target).unwrap();
            std::fs::write(staged.path().join("a"), b"1").unwrap();
        }
        assert!(!target.exists());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);

        let staged = StagedDir::create(&target).unwrap();
        std::fs::write(staged.path().join("a"), b"1").unwrap();
        staged.commit().unwrap();
        assert_eq!(std::fs::read(target.join("a")).unwrap(), b"1");

        // Replacing an existing output.
        let staged = StagedDir::create(&target).unwrap();
        std::fs::write(staged.path().join("b"), b"2").unwrap();
        staged.commit().unwrap();
        assert!(!target.join("a").exists());
        assert_eq!(std::fs::read(target.join("b")).unwrap(), b"2");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn atomic_write_and_emptiness() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f.txt");
        write_atomic(&file, b"hello").unwrap();
        assert_eq!(std::fs::read(&file).unwrap(), b"hello");
        assert!(!is_absent_or_empty(dir.path()).unwrap());
        assert!(is_absent_or_empty(&dir.path().join("none")).unwrap());
        std::fs::create_dir(dir.path().join("empty")).unwrap();
        assert!(is_absent_or_empty(&dir.path().join("empty")).unwrap());
    }
}
