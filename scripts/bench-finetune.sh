#!/usr/bin/env bash
# Full fine-tuning images/s of bccp's channels-last trainer and candle autograd path against
# PyTorch, MobileNetV2 at 64x64 (batch 64) and 224x224 (batch 32), batch-norm frozen, Adam, in
# one run on this machine (see scripts/compare_finetune.py). Sets up the PyTorch venv first
# (scripts/setup-torch-venv.sh).
# Usage: scripts/bench-finetune.sh [--threads N] [--seconds S] [--json FILE]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="$("$here/scripts/setup-torch-venv.sh" | tail -n 1)"
cd "$here"
exec "$python" scripts/compare_finetune.py "$@"
