#!/usr/bin/env bash
# The Python package's tests (python/tests, pytest): build the abi3 wheel with maturin from the
# workspace (it shares target/ with the CLI, so the candle stack is not compiled again), install
# it with pytest, cleanlab and Ray from PyPI into a throwaway venv — never the system Python —
# and run the tests against the release `bccp` binary (the round trips with the CLI's files).
# Env: BCCP_PY_VENV (default: $TMPDIR/bccp-py-venv, reused between runs; delete it to start
# afresh). Extra arguments go to pytest (e.g. -k closest).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
venv="${BCCP_PY_VENV:-${TMPDIR:-/tmp}/bccp-py-venv}"
started=$SECONDS
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --upgrade "maturin>=1.16,<2" "pytest>=7" \
    "cleanlab>=2.6" "ray[data]>=2.9" "numpy>=1.21"
cargo build --release --locked --bin bccp
rm -rf "$venv/wheels"
"$venv/bin/maturin" build --release --locked --quiet -m python/Cargo.toml -o "$venv/wheels" \
    --interpreter "$venv/bin/python"
"$venv/bin/python" -m pip install --quiet --force-reinstall --no-deps "$venv"/wheels/bccp-*.whl
BCCP_BIN="$PWD/target/release/bccp" "$venv/bin/python" -m pytest -q python/tests "$@"
echo "python tests: $((SECONDS - started)) s"
