#!/usr/bin/env bash
# A small model for the server benchmarks (bench-serve.sh, bench-kafka.sh): the first 20 images of
# every class folder of SOURCE prepared under DATA/days (no corruption), then a head on the real
# MobileNetV2 backbone trained at SIZE×SIZE for 2 epochs, registered in DATA/runs as
# `benchSIZE` version 1 with the alias `champion`. What already exists is kept.
# Usage: scripts/bench-model.sh BCCP DATA SOURCE SIZE
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[ $# -eq 4 ] || { echo "usage: scripts/bench-model.sh BCCP DATA SOURCE SIZE" >&2; exit 2; }
bccp=$1 data=$2 source=$3 size=$4
. scripts/paths.sh
assets=$(bccp_assets_dir)
if [ ! -f "$data/days/dataset.json" ]; then
  rm -rf "$data/source" "$data/days"
  mkdir -p "$data/source"
  for class in "$source"/*/; do
    name=$(basename "$class")
    mkdir -p "$data/source/$name"
    mapfile -t files < <(find "$class" -name '*.png' | sort)
    cp "${files[@]:0:20}" "$data/source/$name/"
  done
  "$bccp" --quiet prepare --source "$data/source" --out "$data/days" --corruption none
fi
if [ ! -d "$data/runs/bench$size/1" ]; then
  "$bccp" --quiet train -d "$data/days" --image-size "$size" --epochs 2 \
    --weights "$assets/weights/mobilenet_v2.safetensors" --device cpu --runs-dir "$data/runs" \
    --cache-dir "$data/cache" --model-name "bench$size" >/dev/null
  "$bccp" runs --runs-dir "$data/runs" alias "bench$size" 1 champion
fi
