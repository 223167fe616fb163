#!/usr/bin/env bash
# The MLflow tracking server the MLflow tests start (tests/common/mlflow.rs): PyPI `mlflow`,
# pinned, in a throwaway venv — never the system Python — with the S3 stand-in of the S3 tests
# (PyPI `moto[server]`'s `moto_server`, pinned; tests/common/s3.rs) and boto3 (moto ships it). SQLAlchemy 2.1 breaks mlflow 2.22's
# SQLite store, hence its pin. About 60 s on a fresh venv, a few seconds when already there.
# Env: BCCP_MLFLOW_VENV (default: $TMPDIR/bccp-mlflow-venv, reused between runs).
set -euo pipefail
venv="${BCCP_MLFLOW_VENV:-${TMPDIR:-/tmp}/bccp-mlflow-venv}"
started=$SECONDS
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet "mlflow==2.22.5" "sqlalchemy>=2.0,<2.1" "moto[server]==5.1.22"
"$venv/bin/mlflow" --version
test -x "$venv/bin/moto_server"
echo "mlflow venv: $((SECONDS - started)) s"
