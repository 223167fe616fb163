#!/usr/bin/env bash
# The reference's serving stack (FastAPI + uvicorn + pandas, as its app.py imports, over the PyTorch venv of
# scripts/setup-torch-venv.sh) for the speed scripts that run it beside bccp
# (scripts/bench-serve.sh, scripts/bench-kafka.sh). Idempotent: a venv that already imports
# everything is kept. Usage: scripts/setup-serve-reference-venv.sh DIR; prints its python's path
# on the last line.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
venv="${1:?usage: scripts/setup-serve-reference-venv.sh DIR}"
torch_python=$(scripts/setup-torch-venv.sh | tail -n 1)
if ! "$venv/bin/python" -c 'import fastapi, uvicorn, pandas, torch' 2>/dev/null; then
  rm -rf "$venv"
  "$torch_python" -m venv "$venv"
  "$venv/bin/pip" install --quiet fastapi uvicorn pandas
  # The torch venv's packages (torch, torchvision, pillow, safetensors) are seen from here.
  site=$("$torch_python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  here_site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  echo "$site" > "$here_site/bccp-torch-venv.pth"
  "$venv/bin/python" -c 'import fastapi, uvicorn, pandas, torch, torchvision, PIL'
fi
echo "$venv/bin/python"
