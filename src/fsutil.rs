//! Writing outputs so that they are never half-written: files go to a temporary sibling and
//! are renamed into place; folders are built in a staging sibling and renamed when complete.
//!
//! Every temporary path in use is tracked ([`TempPath`]), so that an interrupted command
//! removes them ([`remove_in_flight`], called on SIGINT/SIGTERM by [`crate::runtime`]), and the
//! temporaries a killed process left behind (`.NAME.TAG-PID…` of a PID that no longer runs)
//! are removed by the next command that writes beside them.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Temporary files and folders of this process that are being written.
static IN_FLIGHT: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// A temporary path tracked while it exists, so a signal handler can remove it. Dropping the
/// guard stops tracking (it does not delete).
#[derive(Debug)]
pub struct TempPath(PathBuf);

impl TempPath {
    /// Starts tracking `path`.
    pub fn track(path: PathBuf) -> Self {
        if let Ok(mut all) = IN_FLIGHT.lock() {
            all.push(path.clone());
        }
        Self(path)
    }

    /// The tracked path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        if let Ok(mut all) = IN_FLIGHT.lock() {
            if let Some(i) = all.iter().rposition(|p| p == &self.0) {
                all.swap_remove(i);
            }
        }
    }
}

/// Removes every temporary file and folder this process is writing (for a signal handler that
/// then exits).
pub fn remove_in_flight() {
    let paths = match IN_FLIGHT.lock() {
        Ok(all) => all.clone(),
        Err(poisoned) => poisoned.into_inner().clone(),
    };
    for path in paths {
        if path.is_dir() {
            // Other threads may still be writing into it: move it out of their way first
            // (their next write fails), then remove it, retrying while stragglers land.
            let trash = path.with_extension("removing");
            let doomed = if std::fs::rename(&path, &trash).is_ok() {
                trash
            } else {
                path.clone()
            };
            for _ in 0..100 {
                let _ = std::fs::remove_dir_all(&doomed);
                if !doomed.exists() && !path.exists() {
                    break;
                }
                let _ = std::fs::remove_dir_all(&path);
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        } else {
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// Whether process `pid` still runs (on systems without `/proc`, assumed to run).
fn process_alive(pid: u32) -> bool {
    if pid == std::process::id() {
        return true;
    }
    let proc = Path::new("/proc");
    !proc.is_dir() || proc.join(pid.to_string()).exists()
}

/// Removes the temporaries in `dir` whose names start with `prefix` followed by the PID of a
/// process that no longer runs (what a killed command left behind).
pub fn remove_stale(dir: &Path, prefix: &str) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(prefix)) else {
            continue;
        };
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        let Ok(pid) = digits.parse::<u32>() else {
            continue;
        };
        if !process_alive(pid) {
            let path = entry.path();
            let _ = if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
        }
    }
}

/// The name prefix of `target`'s temporaries with `tag`: `.NAME.TAG-`.
fn temp_prefix(target: &Path, tag: &str) -> String {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".to_owned());
    format!(".{name}.{tag}-")
}

/// The folder that holds `target`'s temporaries.
fn parent_of(target: &Path) -> &Path {
    match target.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    }
}

/// A temporary sibling of `target`, unique to this process.
fn temp_sibling(target: &Path, tag: &str) -> PathBuf {
    let sibling = format!("{}{}", temp_prefix(target, tag), std::process::id());
    match target.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.join(sibling),
        _ => PathBuf::from(sibling),
    }
}

/// Writes `bytes` to `path` through a temporary file and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    remove_stale(parent_of(path), &temp_prefix(path, "tmp"));
    let tmp = TempPath::track(temp_sibling(path, "tmp"));
    let result = std::fs::write(tmp.path(), bytes).and_then(|()| std::fs::rename(tmp.path(), path));
    if result.is_err() {
        let _ = std::fs::remove_file(tmp.path());
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
    staging: TempPath,
    target: PathBuf,
    committed: bool,
}

impl StagedDir {
    /// Creates the staging folder for `target` (whose parent is created if needed).
    pub fn create(target: &Path) -> io::Result<Self> {
        if let Some(parent) = target.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)?;
        }
        remove_stale(parent_of(target), &temp_prefix(target, "staging"));
        let staging = TempPath::track(temp_sibling(target, "staging"));
        if staging.path().exists() {
            std::fs::remove_dir_all(staging.path())?;
        }
        std::fs::create_dir(staging.path())?;
        Ok(Self {
            staging,
            target: target.to_path_buf(),
            committed: false,
        })
    }

    /// The folder to write into.
    pub fn path(&self) -> &Path {
        self.staging.path()
    }

    /// Moves the finished folder to the target, replacing whatever was there.
    pub fn commit(mut self) -> io::Result<()> {
        if self.target.exists() {
            // Move the old output aside first so the target is never missing a complete copy
            // for longer than two renames.
            let old = temp_sibling(&self.target, "old");
            std::fs::rename(&self.target, &old)?;
            if let Err(e) = std::fs::rename(self.staging.path(), &self.target) {
                let _ = std::fs::rename(&old, &self.target);
                return Err(e);
            }
            let _ = std::fs::remove_dir_all(&old);
        } else {
            std::fs::rename(self.staging.path(), &self.target)?;
        }
        self.committed = true;
        Ok(())
    }
}

impl Drop for StagedDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(self.staging.path());
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
