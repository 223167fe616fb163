"""Helpers the comparison scripts share: the CPU's name, running a criterion bench of bccp in
bencher format, and writing the JSON report."""

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def assets_dir():
    """bccp's assets folder, the rules of src/paths.rs and scripts/paths.sh: BCCP_ASSETS, else
    BCCP_HOME/assets, else the per-user data folder's bccp/assets (XDG_DATA_HOME or
    ~/.local/share; macOS ~/Library/Application Support; Windows %LOCALAPPDATA%)."""
    if os.environ.get("BCCP_ASSETS"):
        return Path(os.environ["BCCP_ASSETS"])
    if os.environ.get("BCCP_HOME"):
        return Path(os.environ["BCCP_HOME"]) / "assets"
    if sys.platform == "darwin":
        data = Path.home() / "Library" / "Application Support"
    elif sys.platform == "win32":
        data = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    else:
        xdg = os.environ.get("XDG_DATA_HOME", "")
        data = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".local" / "share"
    return data / "bccp" / "assets"


def cpu_model():
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_cargo_bench(cmd, threads, die):
    """Runs `cmd` (a `cargo bench ... --output-format bencher` command) in the repository with
    RAYON_NUM_THREADS=threads, echoes its output to stderr and returns it; `die` on failure."""
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    print(f"  running: RAYON_NUM_THREADS={threads} {' '.join(cmd)}", file=sys.stderr, flush=True)
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    except FileNotFoundError:
        die("cargo not found: install Rust, or pass --skip-rust")
    sys.stderr.write(proc.stdout)
    if proc.returncode != 0:
        die(f"cargo bench failed with exit status {proc.returncode}")
    return proc.stdout


def bench_ns(text):
    """Nanoseconds per iteration from a bencher-format figure such as `1,234,567`."""
    return float(text.replace(",", "").replace("_", ""))


def write_json(path, payload):
    """Writes the report (when --json was given) and says so."""
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"\nwrote {path}")
