#!/usr/bin/env bash
# Create (or reuse) a Python virtual environment with PyPI's torch, torchvision, numpy,
# safetensors, pillow, scipy and faiss-cpu, used only by the reference scripts
# (scripts/mobilenet_v2_reference.py, scripts/compare_embed.py, scripts/compare_distance.py) --
# never by bccp itself. Idempotent: an existing venv that already imports all packages is kept.
# CPU use is all the scripts need.
# Usage: scripts/setup-torch-venv.sh   (env: BCCP_TORCH_VENV for another folder, default
# torch-venv in the assets folder (scripts/paths.sh), which the checkout's ./assets links to, so
# assets/torch-venv/bin/python; an existing ./assets/torch-venv is kept; PYTHON for the
# interpreter that creates it, default python3)
# Prints the venv's python path on the last line.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/paths.sh
. "$here/scripts/paths.sh"
default_venv="$(bccp_assets_dir)/torch-venv"
[ -x "$here/assets/torch-venv/bin/python" ] && default_venv="$here/assets/torch-venv"
venv="${BCCP_TORCH_VENV:-$default_venv}"
python="${PYTHON:-python3}"
log() { printf 'setup-torch-venv: %s\n' "$*" >&2; }
die() { printf 'setup-torch-venv: error: %s\n' "$*" >&2; exit 1; }

packages=(torch torchvision numpy safetensors pillow scipy faiss-cpu)
check='import torch, torchvision, numpy, safetensors, PIL, scipy, faiss'

if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "$check" 2>/dev/null; then
  log "venv ready: $venv"
else
  command -v "$python" >/dev/null || die "$python not found (set PYTHON to a Python 3 interpreter)"
  if [ ! -x "$venv/bin/python" ]; then
    log "creating venv at $venv"
    mkdir -p "$(dirname "$venv")"
    "$python" -m venv "$venv" || die "'$python -m venv' failed (on Debian/Ubuntu: apt-get install python3-venv)"
  fi
  log "installing ${packages[*]} from PyPI (several hundred MB the first time)"
  "$venv/bin/python" -m pip install --quiet "${packages[@]}" \
    || die "pip install failed: is PyPI reachable?"
  "$venv/bin/python" -c "$check" || die "packages installed but do not import"
fi
"$venv/bin/python" -c 'import torch, torchvision, scipy, faiss; print(f"setup-torch-venv: torch {torch.__version__}, torchvision {torchvision.__version__}, scipy {scipy.__version__}, faiss {faiss.__version__}")' >&2
echo "$venv/bin/python"
