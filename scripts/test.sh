#!/usr/bin/env bash
# README command 2: set up, then run the test suite (real Ray, DeepSpeed and MLflow; CPU only).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
exec python -m pytest -q "$@"
