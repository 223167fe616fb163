//! bccp's per-user folders, defined once: the home folder, the assets folder (weights, datasets
//! and photos that `scripts/fetch-assets.sh` installs) and the embedding cache.
//!
//! | folder   | first set wins                                                                   |
//! |----------|----------------------------------------------------------------------------------|
//! | home     | `BCCP_HOME`; else the platform data folder + `bccp`                               |
//! | assets   | `BCCP_ASSETS`; else home + `assets`                                               |
//! | cache    | `BCCP_CACHE`; else `BCCP_HOME/cache`; else the platform cache folder + `bccp`     |
//! | store    | home + `store.sqlite3` (the embedded data store, `bccp generate` / `ingest`)      |
//!
//! Platform folders: Linux and other Unix `$XDG_DATA_HOME` (else `~/.local/share`) and
//! `$XDG_CACHE_HOME` (else `~/.cache`); macOS `~/Library/Application Support` and
//! `~/Library/Caches`; Windows `%LOCALAPPDATA%` for data, `%LOCALAPPDATA%\bccp\cache` for the
//! cache. Empty variables count as unset, and relative `XDG_*` values are ignored (as the XDG
//! specification says). Without a home folder (`HOME`, `LOCALAPPDATA`) the fallback is `.bccp`
//! in the current folder.
//!
//! The resolution is written as pure functions of an environment lookup (`*_from`), so tests
//! pass explicit variables instead of changing the process environment. `scripts/paths.sh`
//! and `assets_dir()` in `scripts/benchlib.py` mirror these rules for the scripts.

use std::ffi::OsString;
use std::path::PathBuf;

/// The operating-system family whose folder conventions apply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Platform {
    /// Linux and other Unix systems: the XDG base directories.
    Xdg,
    /// macOS: `~/Library/...`.
    MacOs,
    /// Windows: `%LOCALAPPDATA%`.
    Windows,
}

impl Platform {
    /// The platform this binary was built for.
    pub const CURRENT: Platform = if cfg!(target_os = "macos") {
        Platform::MacOs
    } else if cfg!(target_os = "windows") {
        Platform::Windows
    } else {
        Platform::Xdg
    };
}

/// bccp's home folder: `BCCP_HOME`, else the platform data folder + `bccp`.
pub fn bccp_home() -> PathBuf {
    home_from(Platform::CURRENT, process_env)
}

/// The assets folder (weights, datasets, photos): `BCCP_ASSETS`, else `bccp_home()/assets`.
pub fn assets_dir() -> PathBuf {
    assets_dir_from(Platform::CURRENT, process_env)
}

/// The embedding cache folder: `BCCP_CACHE`, else `BCCP_HOME/cache` when `BCCP_HOME` is set,
/// else the platform cache folder + `bccp`.
pub fn cache_dir() -> PathBuf {
    cache_dir_from(Platform::CURRENT, process_env)
}

/// The embedded data store's file (SQLite): `bccp_home()/store.sqlite3`.
pub fn store_file() -> PathBuf {
    bccp_home().join("store.sqlite3")
}

fn process_env(key: &str) -> Option<OsString> {
    std::env::var_os(key)
}

/// A variable's value as a path; empty counts as unset.
fn var(env: &impl Fn(&str) -> Option<OsString>, key: &str) -> Option<PathBuf> {
    env(key).filter(|v| !v.is_empty()).map(PathBuf::from)
}

/// An `XDG_*` variable: set, non-empty and absolute, else ignored.
fn xdg_var(env: &impl Fn(&str) -> Option<OsString>, key: &str) -> Option<PathBuf> {
    var(env, key).filter(|p| p.is_absolute())
}

/// [`bccp_home`] for `platform` with variables from `env`.
pub fn home_from(platform: Platform, env: impl Fn(&str) -> Option<OsString>) -> PathBuf {
    var(&env, "BCCP_HOME")
        .or_else(|| platform_data_dir(platform, &env).map(|d| d.join("bccp")))
        .unwrap_or_else(|| PathBuf::from(NO_HOME))
}

/// [`assets_dir`] for `platform` with variables from `env`.
pub fn assets_dir_from(platform: Platform, env: impl Fn(&str) -> Option<OsString>) -> PathBuf {
    var(&env, "BCCP_ASSETS").unwrap_or_else(|| home_from(platform, &env).join("assets"))
}

/// [`cache_dir`] for `platform` with variables from `env`.
pub fn cache_dir_from(platform: Platform, env: impl Fn(&str) -> Option<OsString>) -> PathBuf {
    if let Some(dir) = var(&env, "BCCP_CACHE") {
        return dir;
    }
    if let Some(home) = var(&env, "BCCP_HOME") {
        return home.join("cache");
    }
    let dir = match platform {
        Platform::Xdg => xdg_var(&env, "XDG_CACHE_HOME")
            .or_else(|| var(&env, "HOME").map(|h| h.join(".cache")))
            .map(|d| d.join("bccp")),
        Platform::MacOs => var(&env, "HOME").map(|h| h.join("Library/Caches/bccp")),
        Platform::Windows => {
            platform_data_dir(platform, &env).map(|d| d.join("bccp").join("cache"))
        }
    };
    dir.unwrap_or_else(|| PathBuf::from(NO_HOME).join("cache"))
}

/// bccp's home when the user has no home folder (`HOME`, `LOCALAPPDATA`): under the current one.
const NO_HOME: &str = ".bccp";

/// The platform's per-user data folder (without `bccp`), if the user has a home folder.
fn platform_data_dir(
    platform: Platform,
    env: &impl Fn(&str) -> Option<OsString>,
) -> Option<PathBuf> {
    match platform {
        Platform::Xdg => xdg_var(env, "XDG_DATA_HOME")
            .or_else(|| var(env, "HOME").map(|h| h.join(".local/share"))),
        Platform::MacOs => var(env, "HOME").map(|h| h.join("Library/Application Support")),
        Platform::Windows => var(env, "LOCALAPPDATA")
            .or_else(|| var(env, "USERPROFILE").map(|p| p.join("AppData").join("Local"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An environment holding exactly `vars`.
    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<OsString> + 'a {
        move |key| {
            vars.iter()
                .find(|(k, _)| *k == key)
                .map(|(_, v)| OsString::from(v))
        }
    }

    fn p(s: &str) -> PathBuf {
        PathBuf::from(s)
    }

    #[test]
    fn xdg_defaults_come_from_home() {
        let e = env(&[("HOME", "/home/u")]);
        assert_eq!(home_from(Platform::Xdg, &e), p("/home/u/.local/share/bccp"));
        assert_eq!(
            assets_dir_from(Platform::Xdg, &e),
            p("/home/u/.local/share/bccp/assets")
        );
        assert_eq!(cache_dir_from(Platform::Xdg, &e), p("/home/u/.cache/bccp"));
    }

    #[test]
    fn xdg_variables_override_home_when_absolute_and_non_empty() {
        let e = env(&[
            ("HOME", "/home/u"),
            ("XDG_DATA_HOME", "/data"),
            ("XDG_CACHE_HOME", "/fast"),
        ]);
        assert_eq!(assets_dir_from(Platform::Xdg, &e), p("/data/bccp/assets"));
        assert_eq!(cache_dir_from(Platform::Xdg, &e), p("/fast/bccp"));
        let ignored = env(&[
            ("HOME", "/home/u"),
            ("XDG_DATA_HOME", "relative/data"),
            ("XDG_CACHE_HOME", ""),
        ]);
        assert_eq!(
            assets_dir_from(Platform::Xdg, &ignored),
            p("/home/u/.local/share/bccp/assets")
        );
        assert_eq!(
            cache_dir_from(Platform::Xdg, &ignored),
            p("/home/u/.cache/bccp")
        );
    }

    #[test]
    fn bccp_home_moves_assets_and_cache() {
        let e = env(&[
            ("HOME", "/home/u"),
            ("XDG_DATA_HOME", "/data"),
            ("XDG_CACHE_HOME", "/fast"),
            ("BCCP_HOME", "/opt/bccp"),
        ]);
        for platform in [Platform::Xdg, Platform::MacOs, Platform::Windows] {
            assert_eq!(home_from(platform, &e), p("/opt/bccp"));
            assert_eq!(assets_dir_from(platform, &e), p("/opt/bccp/assets"));
            assert_eq!(cache_dir_from(platform, &e), p("/opt/bccp/cache"));
        }
    }

    #[test]
    fn specific_variables_win_over_bccp_home() {
        let e = env(&[
            ("HOME", "/home/u"),
            ("BCCP_HOME", "/opt/bccp"),
            ("BCCP_ASSETS", "/mnt/assets"),
            ("BCCP_CACHE", "/tmp/c"),
        ]);
        for platform in [Platform::Xdg, Platform::MacOs, Platform::Windows] {
            assert_eq!(home_from(platform, &e), p("/opt/bccp"));
            assert_eq!(assets_dir_from(platform, &e), p("/mnt/assets"));
            assert_eq!(cache_dir_from(platform, &e), p("/tmp/c"));
        }
        // Without BCCP_HOME the specific variables still win over the platform folders.
        let e = env(&[
            ("HOME", "/home/u"),
            ("BCCP_ASSETS", "a"),
            ("BCCP_CACHE", "c"),
        ]);
        assert_eq!(assets_dir_from(Platform::Xdg, &e), p("a"));
        assert_eq!(cache_dir_from(Platform::Xdg, &e), p("c"));
    }

    #[test]
    fn empty_bccp_variables_count_as_unset() {
        let e = env(&[
            ("HOME", "/home/u"),
            ("BCCP_HOME", ""),
            ("BCCP_ASSETS", ""),
            ("BCCP_CACHE", ""),
        ]);
        assert_eq!(
            assets_dir_from(Platform::Xdg, &e),
            p("/home/u/.local/share/bccp/assets")
        );
        assert_eq!(cache_dir_from(Platform::Xdg, &e), p("/home/u/.cache/bccp"));
    }

    #[test]
    fn macos_and_windows_folders() {
        let mac = env(&[("HOME", "/Users/u"), ("XDG_DATA_HOME", "/ignored")]);
        assert_eq!(
            assets_dir_from(Platform::MacOs, &mac),
            p("/Users/u/Library/Application Support/bccp/assets")
        );
        assert_eq!(
            cache_dir_from(Platform::MacOs, &mac),
            p("/Users/u/Library/Caches/bccp")
        );
        let win = env(&[("LOCALAPPDATA", r"C:\Users\u\AppData\Local")]);
        let local = p(r"C:\Users\u\AppData\Local");
        assert_eq!(
            assets_dir_from(Platform::Windows, &win),
            local.join("bccp").join("assets")
        );
        assert_eq!(
            cache_dir_from(Platform::Windows, &win),
            local.join("bccp").join("cache")
        );
    }

    #[test]
    fn no_home_at_all_falls_back_to_a_relative_folder() {
        let none = env(&[]);
        for platform in [Platform::Xdg, Platform::MacOs, Platform::Windows] {
            assert_eq!(home_from(platform, &none), p(".bccp"));
            assert_eq!(assets_dir_from(platform, &none), p(".bccp/assets"));
            assert_eq!(cache_dir_from(platform, &none), p(".bccp/cache"));
        }
    }
}
