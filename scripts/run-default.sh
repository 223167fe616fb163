#!/usr/bin/env bash
# The main job on the built-in default: fetch the assets; prepare a Fashion-MNIST Monday/Tuesday
# dataset (mixed corruption, seed 42) under runs/default; then a full Monday→Tuesday run with
# users 70% right: first without cleansing, then BCCP (label-aware, out-of-sample Bayesian cut-off
# of the top 25% + buffer closest-pair replay of half of Monday: the best configuration of
# experiments/fashion-mnist.toml), real MobileNetV2 features at 64×64, and the registry's summary.
# A check of a pretrained classifier on real photos comes first.
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
common=(-d "$days" -t tuesday --tuesday-num 30000 -l user_feedback --user-accuracy 0.7
        --image-size 64 --runs-dir "$out/registry" --seed 42)
echo; echo "### Tuesday, 30% wrong user labels, no cleansing"
$bccp train "${common[@]}" -b N -s none --model-name fashion-mnist-none
echo; echo "### Tuesday, 30% wrong user labels, BCCP (cut-off + closest-pair replay)"
$bccp train "${common[@]}" -b Y --cutoff-percentile 75 --cutoff-folds 5 -s l2_norm -r 0.5 \
  --model-name fashion-mnist-bccp
echo
$bccp runs --runs-dir "$out/registry"
