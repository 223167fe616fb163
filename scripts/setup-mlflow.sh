#!/usr/bin/env bash
# The MLflow tracking server the MLflow tests start (tests/common/mlflow.rs): PyPI `mlflow`,
# pinned, in a throwaway venv — never the system Python. SQLAlchemy 2.1 breaks mlflow 2.22's
# SQLite store, hence its pin. About 60 s on a fresh venv, a few seconds when already there.
# Env: BCCP_MLFLOW_VENV (default: $TMPDIR/bccp-mlflow-venv, reused between runs).
set -euo pipefail
venv="${BCCP_MLFLOW_VENV:-${TMPDIR:-/tmp}/bccp-mlflow-venv}"
started=$SECONDS
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet "mlflow==2.22.5" "sqlalchemy>=2.0,<2.1"
"$venv/bin/mlflow" --version
echo "mlflow venv: $((SECONDS - started)) s"
