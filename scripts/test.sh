#!/usr/bin/env bash
# The whole test suite, as CI runs it on a fresh clone: fetch the real assets the tests use,
# check formatting and lints, then run every test in the release profile (candle in debug is
# 30–40× slower; one profile keeps builds shared with the main job).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/fetch-assets.sh
cargo fmt --all -- --check
cargo clippy --release --all-targets --locked -- -D warnings
cargo test --release --locked
