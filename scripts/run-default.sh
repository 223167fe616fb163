#!/usr/bin/env bash
# The main job on the built-in default: fetch the assets; prepare a Fashion-MNIST Monday/Tuesday
# dataset (mixed corruption, seed 42) under runs/default; embed both days with the real
# MobileNetV2 weights (cached: a rerun takes seconds); check a pretrained classifier on real
# photos. Later stages (sampling, cut-off, training) join this script as they land.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/fetch-assets.sh
cargo build --release --locked --quiet --bin bccp
bccp=target/release/bccp
out=runs/default
days=$out/fashion-mnist-days
if [ -f "$days/dataset.json" ]; then
  echo "run-default: $days exists (delete it to prepare again)"
else
  $bccp prepare --source assets/fashion-mnist/train --out "$days" --corruption mixed --seed 42
fi
$bccp info "$days"
for day in monday tuesday; do
  $bccp embed --data "$days/$day.jsonl" --model mobilenet_v2 --out "$out/$day-mobilenet_v2.safetensors"
done
$bccp classify --model efficientnet_lite0 assets/photos/chelsea.png assets/photos/coffee.png
