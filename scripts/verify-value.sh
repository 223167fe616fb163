#!/usr/bin/env bash
# Measures what reviewing flagged labels buys (issue 20): experiments/verify-value-fashion-mnist.toml
# runs one re-training cycle per cell with 1% or 5% of the day's candidates verified before the
# cut-off (the samples a first cleansing pass flags, most suspicious first, or random samples;
# answers simulated with the true labels), and without review, three seeds each. Prepares the
# main job's Fashion-MNIST days when missing (scripts/run-default.sh makes the same folder).
# Writes the grid's results under runs/experiments/verify-value-fashion-mnist and copies the
# table to docs/verify-value-fashion-mnist.md. Resumable: finished runs are skipped.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/fetch-assets.sh >/dev/null
. scripts/paths.sh
assets=$(bccp_assets_dir)
cargo build --release --locked --quiet --bin bccp
bccp=target/release/bccp
days=runs/default/fashion-mnist-days
if [ ! -f "$days/dataset.json" ]; then
  $bccp --quiet prepare --source "$assets/fashion-mnist/train" --out "$days" --corruption mixed --seed 42
fi
config=experiments/verify-value-fashion-mnist.toml
$bccp experiment --config "$config"
out=runs/experiments/verify-value-fashion-mnist
cp "$out/results.md" docs/verify-value-fashion-mnist.md.tmp
mv docs/verify-value-fashion-mnist.md.tmp docs/verify-value-fashion-mnist.md
cp "$out/results.csv" docs/verify-value-fashion-mnist.csv.tmp
mv docs/verify-value-fashion-mnist.csv.tmp docs/verify-value-fashion-mnist.csv
echo "verify-value: docs/verify-value-fashion-mnist.md"
