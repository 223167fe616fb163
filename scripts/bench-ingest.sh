#!/usr/bin/env bash
# Ingest throughput of the data store, side by side in one run (a comparison, not a timed test):
#   * the reference's way: psycopg2, one INSERT + COMMIT per record (scripts/bench_reference_generator.py)
#   * `bccp generate --bulk` (batched transactions; content hashes from the manifest `bccp prepare`
#     wrote, every image file read and hashed for an older manifest) into PostgreSQL and SQLite
#   * `bccp ingest --folder` (every image read, hashed and strictly decoded) into both, and the
#     floor under it: the same reading, hashing and decoding with no database (examples/ingest_floor.rs)
# on Fashion-MNIST (the assets' 60 000 training images, `bccp prepare`d once), against one local
# PostgreSQL server started here with its durable defaults (fsync on, synchronous_commit on) and
# SQLite in WAL mode with synchronous=FULL. Prints rows/s and the ratio to the reference.
# The server's WAL is warmed up first (see below): the reference and bccp run on the same state.
#
# Usage: scripts/bench-ingest.sh   (env: BENCH_DIR work folder, default /tmp/bccp-bench-ingest;
#        REF_ROWS rows for the reference, default 3000; PG_BIN PostgreSQL's bin folder)
# Needs: PostgreSQL server binaries (Debian's postgresql package), python3 with venv; installs
# psycopg2-binary from PyPI into a venv in the work folder.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/paths.sh
assets=$(bccp_assets_dir)
work=${BENCH_DIR:-/tmp/bccp-bench-ingest}
ref_rows=${REF_ROWS:-3000}
mkdir -p "$work"
cargo build --release --locked --quiet --bin bccp --example ingest_floor
bccp=$PWD/target/release/bccp

pg_bin=${PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)}
[ -x "$pg_bin/initdb" ] || { echo "bench-ingest: no PostgreSQL server binaries (install postgresql or set PG_BIN)" >&2; exit 1; }

# psycopg2 for the reference's way.
if [ ! -x "$work/venv/bin/python" ] || ! "$work/venv/bin/python" -c "import psycopg2" 2>/dev/null; then
  python3 -m venv "$work/venv"
  "$work/venv/bin/pip" install --quiet psycopg2-binary
fi

days=$work/fashion-mnist-days
if [ ! -f "$days/dataset.json" ]; then
  "$bccp" --quiet prepare --source "$assets/fashion-mnist/train" --out "$days" --seed 42
fi

# A throwaway server (as the postgres user when root: PostgreSQL refuses to run as root).
pg=$work/pg
rm -rf "$pg"; mkdir -p "$pg"
as_pg=()
if [ "$(id -u)" -eq 0 ]; then chown postgres:postgres "$pg"; as_pg=(runuser -u postgres --); fi
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"${as_pg[@]}" "$pg_bin/initdb" -D "$pg/data" -U postgres -A trust -E UTF8 >/dev/null
"${as_pg[@]}" "$pg_bin/pg_ctl" -D "$pg/data" -l "$pg/log" -w \
  -o "-p $port -k $pg -c listen_addresses=127.0.0.1" start >/dev/null
trap '"${as_pg[@]}" "$pg_bin/pg_ctl" -D "$pg/data" -m fast -w stop >/dev/null' EXIT
url() { echo "postgres://postgres@127.0.0.1:$port/$1"; }
for db in reference generate ingest; do "$pg_bin/createdb" -h 127.0.0.1 -p "$port" -U postgres "$db"; done
# A fresh cluster creates (zero-fills and syncs) a 16 MB WAL segment for every 16 MB written; a
# server that has run a while recycles old ones at each checkpoint. Write ~90 MB of WAL and
# checkpoint once, so every way below is measured on a server in that steady state.
"$pg_bin/psql" -q -h 127.0.0.1 -p "$port" -U postgres postgres \
  -c "CREATE TABLE warm_up AS SELECT g, repeat('x', 200) AS t FROM generate_series(1, 400000) g" \
  -c "DROP TABLE warm_up" -c "CHECKPOINT"
rm -f "$work"/generate.sqlite3* "$work"/ingest.sqlite3*

rows_of() { # rows in a store's samples table
  case $1 in
    sqlite:*) python3 -c 'import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute("select count(*) from samples").fetchone()[0])' "${1#sqlite:}";;
    *) "$pg_bin/psql" -At "$1" -c "select count(*) from samples";;
  esac
}
results=()
timed() { # label url command...
  local label=$1 url=$2; shift 2
  # Bash's clock (no process started around the command, unlike a python3 -c per reading).
  local t0 t1; t0=$EPOCHREALTIME; "$@" >/dev/null; t1=$EPOCHREALTIME
  results+=("$label|$(rows_of "$url")|$(python3 -c "print($t1-$t0)")")
}

read -r ref_n ref_s < <("$work/venv/bin/python" scripts/bench_reference_generator.py "$(url reference)" "$days/monday.jsonl" "$ref_rows")
results+=("reference: psycopg2, one commit per row (PostgreSQL)|$ref_n|$ref_s")
timed "bccp generate --bulk, PostgreSQL" "$(url generate)" "$bccp" --quiet generate -d "$days" --bulk --db "$(url generate)"
timed "bccp generate --bulk, SQLite" "sqlite:$work/generate.sqlite3" "$bccp" --quiet generate -d "$days" --bulk --db "sqlite:$work/generate.sqlite3"
timed "bccp ingest --folder (decode + hash), PostgreSQL" "$(url ingest)" "$bccp" --quiet ingest --folder "$days/monday" --db "$(url ingest)"
timed "bccp ingest --folder (decode + hash), SQLite" "sqlite:$work/ingest.sqlite3" "$bccp" --quiet ingest --folder "$days/monday" --db "sqlite:$work/ingest.sqlite3"
# The floor under `ingest --folder`: the same scan, read, hash and decode of every file, no database.
read -r floor_n floor_s < <(target/release/examples/ingest_floor "$days/monday")
results+=("floor: scan + read + hash + decode only, no database|$floor_n|$floor_s")

ref_rate=$(python3 -c "print($ref_n/$ref_s)")
printf '%-52s %8s %9s %10s %12s\n' way rows seconds rows/s "× reference"
for r in "${results[@]}"; do
  IFS='|' read -r label n s <<<"$r"
  python3 -c "import sys; n,s,ref=int(sys.argv[2]),float(sys.argv[3]),float(sys.argv[4]); print(f'{sys.argv[1]:<52} {n:>8} {s:>9.2f} {n/s:>10.0f} {n/s/ref:>11.1f}×')" "$label" "$n" "$s" "$ref_rate"
done
echo "($(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg); PostgreSQL $("$pg_bin/postgres" --version | awk '{print $3}') with fsync on; SQLite WAL, synchronous=FULL)"
