"""Shared helpers of the Python package's tests: the repository, the fetched real assets (the
same folder the binary reads: scripts/paths.sh), the `bccp` binary built next to the wheel, a
safetensors reader independent of bccp, and a small real Fashion-MNIST image folder."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]


def assets_dir() -> Path:
    """BCCP_ASSETS, else BCCP_HOME/assets, else the per-user folder (scripts/paths.sh)."""
    out = subprocess.run(
        ["bash", "-c", f'source "{REPO}/scripts/paths.sh" && bccp_assets_dir'],
        check=True,
        capture_output=True,
        text=True,
    )
    return Path(out.stdout.strip())


def asset(rel: str) -> Path:
    path = assets_dir() / rel
    if not path.exists():
        pytest.fail(
            f"missing asset {path}: run scripts/fetch-assets.sh (scripts/test.sh does), "
            "or set BCCP_ASSETS or BCCP_HOME"
        )
    return path


def bccp_bin() -> Path:
    path = Path(os.environ.get("BCCP_BIN", REPO / "target" / "release" / "bccp"))
    if not path.is_file():
        pytest.fail(f"no bccp binary at {path}: run `cargo build --release` (or set BCCP_BIN)")
    return path


def cli(*args, ok=True) -> subprocess.CompletedProcess:
    """Runs `bccp --quiet ARGS`; with ok, it must succeed."""
    out = subprocess.run(
        [str(bccp_bin()), "--quiet", *map(str, args)], capture_output=True, text=True
    )
    if ok and out.returncode != 0:
        pytest.fail(f"bccp {' '.join(map(str, args))} failed: {out.stderr}")
    return out


_DTYPES = {"F32": np.float32, "F64": np.float64, "I64": np.int64, "U8": np.uint8, "U32": np.uint32}


def read_safetensors(path: Path):
    """(tensors by name, metadata) of a safetensors file, read with numpy only."""
    raw = Path(path).read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + size])
    meta = header.pop("__metadata__", {})
    data = raw[8 + size :]
    tensors = {}
    for name, info in header.items():
        start, end = info["data_offsets"]
        tensors[name] = np.frombuffer(data[start:end], dtype=_DTYPES[info["dtype"]]).reshape(
            info["shape"]
        )
    return tensors, meta


def write_bmp(path: Path, rgb: np.ndarray) -> None:
    """A 24-bit BMP of an [H, W, 3] uint8 array (bottom-up rows, BGR, rows padded to 4)."""
    h, w, _ = rgb.shape
    row = (3 * w + 3) // 4 * 4
    pixels = bytearray()
    for y in range(h - 1, -1, -1):
        line = rgb[y, :, ::-1].tobytes()
        pixels += line + b"\0" * (row - len(line))
    header = b"BM" + (54 + len(pixels)).to_bytes(4, "little") + b"\0\0\0\0" + (54).to_bytes(4, "little")
    info = (
        (40).to_bytes(4, "little")
        + w.to_bytes(4, "little")
        + h.to_bytes(4, "little")
        + (1).to_bytes(2, "little")
        + (24).to_bytes(2, "little")
        + (0).to_bytes(4, "little")
        + len(pixels).to_bytes(4, "little")
        + (2835).to_bytes(4, "little") * 2
        + (0).to_bytes(4, "little") * 2
    )
    Path(path).write_bytes(header + info + bytes(pixels))


@pytest.fixture(scope="session")
def weights() -> Path:
    """The real MobileNetV2 weights (ImageNet, torchvision layout) fetched by fetch-assets."""
    return asset("weights/mobilenet_v2.safetensors")


@pytest.fixture(scope="session")
def fmnist_subset(tmp_path_factory) -> Path:
    """A real image folder ROOT/<class>/<file>: the first 12 Fashion-MNIST training images of
    four classes (copies of the fetched PNGs)."""
    source = asset("fashion-mnist/train")
    root = tmp_path_factory.mktemp("fmnist") / "images"
    for cls in ["bag", "coat", "sandal", "trouser"]:
        files = sorted((source / cls).glob("*.png"))[:12]
        if len(files) < 12:
            pytest.fail(f"{source / cls} holds {len(files)} images; expected 12 or more")
        (root / cls).mkdir(parents=True)
        for f in files:
            shutil.copyfile(f, root / cls / f.name)
    return root
