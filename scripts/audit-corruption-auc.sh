#!/usr/bin/env bash
# Measures `bccp audit`'s corrupted-image detector on real data: a subset of Fashion-MNIST
# (the first PER_CLASS training images of every class, default 500), `bccp prepare`d with the
# mixed corruption (seed 42), audited; the summary's corruption_check compares the score of
# every corrupted Tuesday image (positive) with its clean original (negative) and prints the
# ROC AUC, over all and over the images whose pixels changed. Needs scripts/fetch-assets.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/paths.sh
assets=$(bccp_assets_dir)
per_class=${PER_CLASS:-500}
cargo build --release --locked --quiet --bin bccp
bccp=target/release/bccp
work=runs/audit-auc
rm -rf "$work"
mkdir -p "$work/source"
for dir in "$assets/fashion-mnist/train"/*/; do
  class=$(basename "$dir")
  mkdir -p "$work/source/$class"
  mapfile -t files < <(find "$dir" -maxdepth 1 -name '*.png' | sort)
  cp "${files[@]:0:$per_class}" "$work/source/$class/"
done
$bccp --quiet prepare --source "$work/source" --out "$work/days" --corruption mixed --seed 42
$bccp --quiet audit --dataset "$work/days" --out "$work/audit" --image-size 32 \
  --weights "$assets/weights/mobilenet_v2.safetensors" --device cpu
python3 -c 'import json,sys; print(json.dumps(json.load(open(sys.argv[1]))["corruption_check"], indent=1))' "$work/audit/summary.json"
