#!/usr/bin/env bash
# The main job on the built-in default: the self-cleansing loop on the embedded SQLite store.
# Fetch the assets; check a pretrained classifier on real photos; prepare a Fashion-MNIST
# Monday/Tuesday dataset (mixed corruption, seed 42) under runs/default; then `bccp up` on a
# fresh store: the Monday stream arrives and a first model is promoted; the corrupted Tuesday
# stream arrives with users 70% right, and two challengers are trained side by side — no
# cleansing, and BCCP (out-of-sample Bayesian cut-off with the combined MC + k-NN score, each
# class cut by the confident joint's estimate of its noise, replayed rows trusted + buffer
# closest-pair replay of half of the champion's training data: the configuration that won the
# cleansing grids overall, experiments/cleansing-*.toml) — on real MobileNetV2 features at
# 64×64; the gate decides. A closing table shows every cycle. While it runs, `bccp up` also
# serves the champion on http://127.0.0.1:8000 (predictions, feedback, /metrics, /dashboard;
# --no-serve turns it off); with the default --duration 0 it stops, server included, once both
# days are done.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/fetch-assets.sh
. scripts/paths.sh
assets=$(bccp_assets_dir) # where fetch-assets.sh installed them (BCCP_ASSETS, BCCP_HOME, per-user)
cargo build --release --locked --quiet --bin bccp
bccp=target/release/bccp
out=runs/default
days=$out/fashion-mnist-days
$bccp classify --backbone efficientnet_lite0 --top 1 "$assets/photos/chelsea.png" "$assets/photos/coffee.png"
if [ -f "$days/dataset.json" ]; then
  echo "run-default: $days exists (delete it to prepare again)"
else
  $bccp prepare --source "$assets/fashion-mnist/train" --out "$days" --corruption mixed --seed 42
fi
$bccp info "$days"
# Every run starts the loop afresh: a new store and registry (the embedding cache is kept).
rm -rf "$out/loop"
mkdir -p "$out/loop"
$bccp --quiet up --db "sqlite:$out/loop/store.sqlite3" --runs-dir "$out/loop/registry" \
  --generate "$days" --user-accuracy 0.7 --model fashion-mnist \
  --method none,bccp --sampling l2_norm --ratio 0.5 --cutoff-score combined \
  --cutoff-percentile joint --cutoff-scope per_class --cutoff-folds 5 --cutoff-trust-replay true \
  --image-size 64 --seed 42
