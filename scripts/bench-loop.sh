#!/usr/bin/env bash
# Time from a record's arrival to a promoted model, for a cycle of N new samples (default
# 5 000), on the embedded SQLite store (a measurement, not a timed test):
#   1. Fashion-MNIST's Monday arrives in bulk and a first champion is promoted (not timed);
#   2. N corrupted Tuesday records with users 70% right arrive through `bccp generate` (the
#      clock starts before the first is written);
#   3. `bccp retrain --method bccp` embeds what is new (a fresh embedding cache: every new image
#      and the gate set are embedded, nothing is reused from earlier runs), replays, cleanses,
#      trains and gates; the clock stops when the promotion has committed.
# Prints the arrival, cycle and total seconds and the decision.
#
# Usage: scripts/bench-loop.sh   (env: BENCH_DIR work folder, default /tmp/bccp-bench-loop;
#        NEW new samples, default 5000)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/paths.sh
assets=$(bccp_assets_dir)
work=${BENCH_DIR:-/tmp/bccp-bench-loop}
new=${NEW:-5000}
mkdir -p "$work"
cargo build --release --locked --quiet --bin bccp
bccp=$PWD/target/release/bccp
days=$work/fashion-mnist-days
if [ ! -f "$days/dataset.json" ]; then
  "$bccp" --quiet prepare --source "$assets/fashion-mnist/train" --out "$days" --corruption mixed --seed 42
fi
rm -rf "$work/store.sqlite3"* "$work/registry" "$work/cache"
db=sqlite:$work/store.sqlite3
common=(--db "$db" --model bench --image-size 64 --runs-dir "$work/registry" --cache-dir "$work/cache"
        --weights "$assets/weights/mobilenet_v2.safetensors" --offline)
"$bccp" --quiet generate -d "$days" --db "$db" --day monday --bulk
"$bccp" --quiet retrain "${common[@]}" --method none | head -2
t0=$(date +%s.%N)
"$bccp" --quiet generate -d "$days" --db "$db" --day tuesday --rate 1000000/s --limit "$new" \
  --user-accuracy 0.7
t1=$(date +%s.%N)
"$bccp" --quiet retrain "${common[@]}" --method bccp --cutoff-folds 5 | tee "$work/cycle.txt"
t2=$(date +%s.%N)
grep -q PROMOTED "$work/cycle.txt" && decision=promoted || decision="not promoted"
python3 - "$t0" "$t1" "$t2" "$new" "$decision" <<'PY'
import sys
t0, t1, t2 = map(float, sys.argv[1:4])
print(f"bench-loop: {sys.argv[4]} new samples: arrival {t1 - t0:.1f} s, cycle {t2 - t1:.1f} s, "
      f"arrival to {sys.argv[5]} model {t2 - t0:.1f} s")
PY
