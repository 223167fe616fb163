//! Headless Chromium (Debian's `chromium`, which `scripts/test.sh` installs): screenshots of
//! the pages bccp writes or serves, for tests that check what a person would see.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The Chromium binary; the tests that need it fail, not skip, without it.
pub fn chromium() -> PathBuf {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .or_else(|| {
            std::env::var_os("PATH").and_then(|p| {
                std::env::split_paths(&p)
                    .map(|d| d.join("chromium"))
                    .find(|c| c.is_file())
            })
        })
        .unwrap_or_else(|| {
            panic!(
                "chromium not found: install Debian's `chromium` package (scripts/test.sh does: \
                 apt-get install -y chromium); these tests do not skip"
            )
        })
}

/// Screenshots `url` at `width`×`height` into `shot` (a fresh profile, no network extras, 90 s
/// at most) and returns the image; fails the test when no screenshot was written.
pub fn screenshot(url: &str, width: u32, height: u32, shot: &Path) -> image::RgbaImage {
    let profile = tempfile::tempdir().unwrap();
    let out = Command::new("timeout")
        .arg("90")
        .arg(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--no-first-run",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
        ])
        .arg(format!("--window-size={width},{height}"))
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("--screenshot={}", shot.display()))
        .arg(url)
        .output()
        .unwrap();
    assert!(
        shot.is_file(),
        "no screenshot: {:?}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    image::open(shot).unwrap().to_rgba8()
}
