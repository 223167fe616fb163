#!/usr/bin/env bash
# Remakes docs/mlflow-run.png: a bccp train run as MLflow's UI shows it, on its "Model metrics"
# tab (the per-epoch curves train_acc, test_acc, epoch.loss, …), taken with headless Chromium.
# A throwaway `mlflow server` (the venv of scripts/setup-mlflow.sh, SQLite store, proxied
# artifacts, 127.0.0.1 and a free port) is started and stopped here; the run is a head training
# on 400 Fashion-MNIST images (120 of each class prepared, the Monday split), 64×64, 20 epochs.
# Needs: target/release/bccp (or BCCP_BIN), the assets (scripts/fetch-assets.sh), chromium.
# Usage: scripts/mlflow-screenshot.sh [OUT.png]   (default docs/mlflow-run.png)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/paths.sh
assets=$(bccp_assets_dir)
out_png=${1:-docs/mlflow-run.png}
bccp=${BCCP_BIN:-target/release/bccp}
venv="${BCCP_MLFLOW_VENV:-${TMPDIR:-/tmp}/bccp-mlflow-venv}"
[ -x "$venv/bin/mlflow" ] || scripts/setup-mlflow.sh
work=$(mktemp -d)
port=$("$venv/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
uri=http://127.0.0.1:$port
setsid "$venv/bin/python" -m mlflow server --backend-store-uri "sqlite:///$work/mlflow.db" \
  --artifacts-destination "$work/artifacts" --serve-artifacts --host 127.0.0.1 --port "$port" \
  --workers 1 >"$work/mlflow.log" 2>&1 &
server=$!
trap 'kill -TERM -- -$server 2>/dev/null || true; rm -rf "$work"' EXIT
for _ in $(seq 120); do
  curl -fs "$uri/health" >/dev/null 2>&1 && break
  sleep 1
done
curl -fs "$uri/health" >/dev/null || { cat "$work/mlflow.log"; exit 1; }
# 120 images of each class of the Fashion-MNIST training set, linked.
for class_dir in "$assets"/fashion-mnist/train/*/; do
  class=$(basename "$class_dir")
  mkdir -p "$work/source/$class"
  mapfile -t picked < <(find "$class_dir" -maxdepth 1 -type f | sort)
  for f in "${picked[@]:0:120}"; do ln -s "$f" "$work/source/$class/"; done
done
"$bccp" prepare --source "$work/source" --out "$work/days" --corruption mixed --seed 42
"$bccp" --quiet train -d "$work/days" -t monday --monday-num 400 --image-size 64 --epochs 20 \
  --weights "$assets/weights/mobilenet_v2.safetensors" --device cpu \
  --runs-dir "$work/runs" --cache-dir "$work/cache" --model-name fashion-mnist \
  --mlflow "$uri" --mlflow-experiment fashion-mnist
page=$("$venv/bin/python" - "$uri" <<'EOF'
import sys
from mlflow import MlflowClient
c = MlflowClient(sys.argv[1], registry_uri=sys.argv[1])
v = c.get_model_version("fashion-mnist", "1")
run = c.get_run(v.run_id)
print(f"{sys.argv[1]}/#/experiments/{run.info.experiment_id}/runs/{v.run_id}/model-metrics")
EOF
)
profile=$(mktemp -d)
timeout 120 chromium --headless --no-sandbox --disable-gpu --disable-background-networking \
  --no-first-run --disable-component-update --disable-sync --hide-scrollbars \
  --window-size=1400,1100 --virtual-time-budget=60000 --run-all-compositor-stages-before-draw \
  --user-data-dir="$profile" \
  --screenshot="$out_png" "$page" 2>/dev/null
rm -rf "$profile"
echo "mlflow-screenshot: $page -> $out_png"
