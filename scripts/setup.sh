#!/usr/bin/env bash
# Creates .venv with moelab and its pinned dependencies; a no-op when pyproject.toml has not changed since.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.moelab-installed
want=$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
[ -d .venv ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip setuptools wheel
# torch first, pinned: it is the CPU build on disk here; anything unpinned would pull a multi-GB CUDA build.
pip install -q torch==2.13.0
# DeepSpeed ships only an sdist whose setup.py imports torch: build it against the torch above, no JIT ops.
DS_BUILD_OPS=0 pip install -q --no-build-isolation deepspeed==0.19.8
pip install -q -e '.[test]'
echo "$want" > "$stamp"
