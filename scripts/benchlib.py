"""Helpers the comparison scripts share: the CPU's name, running a criterion bench of bccp in
bencher format, writing the JSON report, and starting local servers (a free port, waiting until
a URL answers)."""

import json
import os
import platform
import socket
import subprocess
import sys
import time
import urllib.request
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


def free_port():
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url, proc, what, limit=120):
    """Waits until GET `url` answers 200; exits naming `what` if `proc` ends or time runs out."""
    start = time.time()
    while time.time() - start < limit:
        if proc.poll() is not None:
            sys.exit(f"{what} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    sys.exit(f"{what}: {url} not ready after {limit} s")


def start_reference_server(python, script, root, weights, run, size, extra=()):
    """The reference's serving stack (bench_serve_reference.py under `python`, with `extra`
    arguments, e.g. `--no-grad`) for the latest version of the bccp run folder `run` (its head)
    at `size`×`size`, on a free port; returns (process, the /predict URL) once /healthz
    answers."""
    version = max(int(v) for v in os.listdir(run) if v.isdigit())
    port = free_port()
    proc = subprocess.Popen(
        [python, script, "--root", root, "--weights", weights,
         "--head", os.path.join(run, str(version), "model.safetensors"), "--size", str(size),
         "--port", str(port), *extra], stdout=subprocess.DEVNULL)
    try:
        wait_ready(f"http://127.0.0.1:{port}/healthz", proc, "the reference server")
    except BaseException:
        proc.terminate()
        raise
    return proc, f"http://127.0.0.1:{port}/predict"
