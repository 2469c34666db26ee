#!/usr/bin/env bash
# README command 2: set up, then run the test suite (real Ray, DeepSpeed and MLflow; CPU only).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
# CI and the default: the fast tests and a bounded subset of the end-to-end ones. An end-to-end run left out is marked
# `extended` and names the CI tests that cover it (tests/suite.py); `--all` runs those too. A later -m replaces ours.
# Two pytest workers, a test file each at a time: most tests keep one core busy; a file keeps its module fixtures.
PARALLEL=(-n "${MOELAB_TEST_WORKERS:-2}" --dist loadfile)
if [ "${1:-}" = "--all" ]; then shift; exec python -m pytest -q "${PARALLEL[@]}" "$@"; fi
exec python -m pytest -q "${PARALLEL[@]}" -m "not extended" "$@"
