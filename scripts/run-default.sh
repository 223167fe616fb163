#!/usr/bin/env bash
# The main job on the built-in default: fetch the assets, prepare a Fashion-MNIST
# Monday/Tuesday dataset (mixed corruption, seed 42) under runs/default, and summarise it.
# Later stages (embedding, cleansing, training) join this script as they land.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/fetch-assets.sh
cargo build --release --locked --quiet --bin bccp
bccp=target/release/bccp
out=runs/default/fashion-mnist-days
$bccp prepare --source assets/fashion-mnist/train --out "$out" --corruption mixed --seed 42 --force
$bccp info "$out"
