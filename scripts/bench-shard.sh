#!/usr/bin/env bash
# Sharded vs single-process exact search on the CPU: time and peak resident memory of
#   * `bccp closest` over the whole candidate file,
#   * the same search cut into N shards (`closest --candidates-shard J/N`), one after another,
#   * the same N shards two at a time (`xargs -P 2`),
#   * `bccp merge-topk` of the N parts,
# on a random candidate file (default 1M x 512 f32, 2.0 GB) and a random query file. Checks that
# the merged result is byte-identical to the single-process one. Prints a Markdown table.
#
# Usage: scripts/bench-shard.sh   (env: BENCH_DIR work folder, default /tmp/bccp-bench-shard;
#        ROWS candidates, default 1000000; QUERIES default 4000; DIM default 512; SHARDS N,
#        default 4; K default 10; METRIC default l2)
# Needs: GNU time (/usr/bin/time -v). The files are made once and kept in BENCH_DIR.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
work=${BENCH_DIR:-/tmp/bccp-bench-shard}
rows=${ROWS:-1000000}
queries=${QUERIES:-4000}
dim=${DIM:-512}
shards=${SHARDS:-4}
k=${K:-10}
metric=${METRIC:-l2}
[ -x /usr/bin/time ] || { echo "bench-shard: needs GNU time at /usr/bin/time (Debian package time)" >&2; exit 1; }
mkdir -p "$work"
cargo build --release --locked --quiet --bin bccp --example random_embeddings
bccp=$PWD/target/release/bccp
gen=$PWD/target/release/examples/random_embeddings
cand=$work/candidates-$rows-$dim.safetensors
qry=$work/queries-$queries-$dim.safetensors
[ -f "$cand" ] || "$gen" "$rows" "$dim" 1 "$cand"
[ -f "$qry" ] || "$gen" "$queries" "$dim" 2 "$qry"
rm -f "$work"/out-*.safetensors "$work"/*.time

# measure NAME CMD...: runs CMD under GNU time into NAME.time.
measure() {
  local name=$1; shift
  /usr/bin/time -v -o "$work/$name.time" "$@" >/dev/null
}
wall() { awk -F': ' '/Elapsed \(wall clock\)/ {n=split($2,t,":"); s=0; for(i=1;i<=n;i++) s=s*60+t[i]; printf "%.1f", s}' "$1"; }
cpu() { awk -F': ' '/Percent of CPU/ {print $2}' "$1"; }
rss_gb() { awk -F': ' '/Maximum resident set size/ {printf "%.2f", $2/1048576}' "$1"; }
now() { date +%s.%N; }

load=$(cut -d' ' -f1-3 /proc/loadavg)
search=(closest --queries "$qry" --candidates "$cand" --metric "$metric" --k "$k" --device cpu)
measure single "$bccp" --quiet "${search[@]}" --out "$work/out-single.safetensors"

t0=$(now)
for ((j = 0; j < shards; j++)); do
  measure "seq-$j" "$bccp" --quiet "${search[@]}" --candidates-shard "$j/$shards" --out "$work/out-seq-$j.safetensors"
done
seq_wall=$(echo "$(now) - $t0" | bc)

export bccp work metric k qry cand shards
export -f measure
t0=$(now)
seq 0 $((shards - 1)) | xargs -P 2 -I{} bash -c \
  'measure par-{} "$bccp" --quiet closest --queries "$qry" --candidates "$cand" --metric "$metric" --k "$k" --device cpu --candidates-shard {}/"$shards" --out "$work/out-par-{}.safetensors"'
par_wall=$(echo "$(now) - $t0" | bc)

measure merge "$bccp" --quiet merge-topk --out "$work/out-merged.safetensors" \
  $(for ((j = shards - 1; j >= 0; j--)); do echo "$work/out-seq-$j.safetensors"; done)
cmp "$work/out-single.safetensors" "$work/out-merged.safetensors" \
  || { echo "bench-shard: the merged result differs from the single-process one" >&2; exit 1; }
"$bccp" --quiet merge-topk --out "$work/out-merged-par.safetensors" "$work"/out-par-*.safetensors >/dev/null
cmp "$work/out-single.safetensors" "$work/out-merged-par.safetensors" \
  || { echo "bench-shard: the merged (parallel) result differs from the single-process one" >&2; exit 1; }

max_of() { local m=0 v; for f in "$@"; do v=$(rss_gb "$f"); m=$(echo "if ($v > $m) $v else $m" | bc); done; printf "%.2f" "$m"; }
mean_wall() { local s=0; for f in "$@"; do s=$(echo "$s + $(wall "$f")" | bc); done; printf "%.1f" "$(echo "$s / $#" | bc -l)"; }
size=$(awk -v b="$(stat -c %s "$cand")" 'BEGIN {printf "%.2f", b/1073741824}')
flop=$(echo "2 * $rows * $queries * $dim" | bc)
single_s=$(wall "$work/single.time")
echo "candidates $rows x $dim ($size GiB), $queries queries, $metric, k = $k, $shards shards, $(nproc) cores, load average before: $load"
echo
echo "| run | wall time (s) | peak RSS per process (GiB) | CPU per process | throughput (query-candidate pairs/s) |"
echo "|---|---:|---:|---:|---:|"
printf "| single process | %s | %s | %s | %.2e |\n" "$single_s" "$(rss_gb "$work/single.time")" "$(cpu "$work/single.time")" "$(echo "$rows * $queries / $single_s" | bc -l)"
printf "| %s shards one after another (each %s s) | %.1f | %s | %s | %.2e |\n" "$shards" "$(mean_wall "$work"/seq-*.time)" "$seq_wall" "$(max_of "$work"/seq-*.time)" "$(cpu "$work/seq-0.time")" "$(echo "$rows * $queries / $seq_wall" | bc -l)"
printf "| %s shards, 2 at a time | %.1f | %s | %s | %.2e |\n" "$shards" "$par_wall" "$(max_of "$work"/par-*.time)" "$(cpu "$work/par-0.time")" "$(echo "$rows * $queries / $par_wall" | bc -l)"
printf "| merge-topk of %s parts | %s | %s | %s | |\n" "$shards" "$(wall "$work/merge.time")" "$(rss_gb "$work/merge.time")" "$(cpu "$work/merge.time")"
echo
printf "single process: %.0f GFLOP/s (2·Q·N·D / wall time); merged result byte-identical to the single-process one\n" \
  "$(echo "$flop / $single_s / 1000000000" | bc -l)"
