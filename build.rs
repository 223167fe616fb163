//! Compiles `kernels/*.cu` to PTX with nvcc when the `cuda` feature is on; nothing otherwise.
//! Environment: `NVCC` (default `nvcc` on PATH), `CUDA_COMPUTE_CAP` (default 90 → sm_90).
//! Also records the git commit being built as `BCCP_GIT_COMMIT` (MLflow's run tag), when the
//! source is a git checkout and the variable is not set already.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=NVCC");
    git_commit();
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".to_owned());
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".to_owned());
    let cap: String = cap.chars().filter(char::is_ascii_digit).collect();
    let mut kernels: Vec<PathBuf> = std::fs::read_dir("kernels")
        .expect("kernels/ exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect();
    kernels.sort();
    for cu in kernels {
        let stem = cu
            .file_stem()
            .expect("a file name")
            .to_string_lossy()
            .into_owned();
        let ptx = out.join(format!("{stem}.ptx"));
        let status = Command::new(&nvcc)
            .args([
                "-ptx",
                "-O3",
                "-std=c++17",
                &format!("-arch=sm_{cap}"),
                "-o",
            ])
            .arg(&ptx)
            .arg(&cu)
            .status()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run {nvcc} for {} (set NVCC or PATH; see scripts/build-cuda.sh): {e}",
                    cu.display()
                )
            });
        assert!(status.success(), "{nvcc} failed on {}", cu.display());
    }
}

/// `git` with `args` in the source folder, its trimmed output when it succeeds.
fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
        .filter(|s| !s.is_empty())
}

/// Sets `BCCP_GIT_COMMIT` to `git rev-parse HEAD`, re-run when HEAD or its branch moves.
fn git_commit() {
    println!("cargo:rerun-if-env-changed=BCCP_GIT_COMMIT");
    if std::env::var_os("BCCP_GIT_COMMIT").is_some() {
        return;
    }
    let Some(commit) = git(&["rev-parse", "HEAD"]) else {
        return;
    };
    println!("cargo:rustc-env=BCCP_GIT_COMMIT={commit}");
    let mut watched = vec!["HEAD".to_owned(), "packed-refs".to_owned()];
    watched.extend(git(&["symbolic-ref", "-q", "HEAD"]));
    for name in watched {
        if let Some(path) = git(&["rev-parse", "--git-path", &name]) {
            if std::path::Path::new(&path).exists() {
                println!("cargo:rerun-if-changed={path}");
            }
        }
    }
}
