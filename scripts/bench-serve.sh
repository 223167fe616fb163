#!/usr/bin/env bash
# Load test of the prediction server against the reference's serving stack, side by side in
# one run on this machine, same model, same images, same requests (JSON {"image_path"} under
# one image root, cycling over 50 Fashion-MNIST images): `bccp serve` (dynamic batching,
# predictions logged to an SQLite store) and FastAPI + uvicorn + PyTorch MobileNetV2 written as
# the reference's api_serving/app.py does it (scripts/bench_serve_reference.py: a DataFrame and
# the transforms per request, resize, normalise 0.5, one image per request through the network
# with autograd on, no database write), and the same tuned (torch.no_grad(), no DataFrame).
# For each input size (256×256 as the reference, 64×64 as the main job serves) and
# concurrency 1, 8, 32: requests/s, p50 and p99 latency from `wrk`
# (keep-alive connections, one client thread), SECONDS per cell (default 10) after a 2 s
# warm-up; 127.0.0.1 only. Both models are the real MobileNetV2 backbone with a head trained here
# (bccp train, Fashion-MNIST, 2 epochs); the reference loads the same backbone and head.
# Needs: wrk (Debian package, installed if missing), the torch venv (scripts/setup-torch-venv.sh)
# and a venv with fastapi + uvicorn under target/bench-serve that sees it
# (scripts/setup-serve-reference-venv.sh).
# Usage: scripts/bench-serve.sh   (env: SECONDS_PER_CELL, SIZES=256,64, CONCURRENCY=1,8,32;
#        BF16=1 also times `bccp serve --precision bf16`)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/paths.sh
assets=$(bccp_assets_dir)
out=target/bench-serve
mkdir -p "$out"
cargo build --release --locked --quiet --bin bccp
bccp=target/release/bccp

if ! command -v wrk >/dev/null; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y wrk
fi
python=$(scripts/setup-serve-reference-venv.sh "$out/venv" | tail -n 1)

# 20 Fashion-MNIST test images per class, prepared, and one model per input size.
data="$out/data"
weights="$assets/weights/mobilenet_v2.safetensors"
IFS=, read -r -a sizes <<< "${SIZES:-256,64}"
for size in "${sizes[@]}"; do
  scripts/bench-model.sh "$bccp" "$data" "$assets/fashion-mnist/test" "$size"
done

python3 scripts/bench_serve.py --bccp "$bccp" --runs "$data/runs" --days "$data/days" \
  --python "$python" --reference scripts/bench_serve_reference.py --weights "$weights" \
  --cache "$data/cache" --sizes "${SIZES:-256,64}" --concurrency "${CONCURRENCY:-1,8,32}" \
  --seconds "${SECONDS_PER_CELL:-10}" ${BF16:+--bf16}
