#!/usr/bin/env bash
# README command 1: set up, then run the quickstart study on the embedded default (local Ray, SQLite MLflow, CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
exec moelab run studies/quickstart.yaml --workdir "${MOELAB_WORKDIR:-./moelab-runs}" "$@"
