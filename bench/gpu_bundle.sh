#!/usr/bin/env bash
# Build .gpu/site.tar.xz: what moelab needs on the GPU machine and its image lacks (bench/gpu_wheels.txt), unpacked
# for CPython 3.12 on x86-64 and compressed with xz, to travel with the working tree (`run(carry=[".gpu"])`).
# Needs PyPI (run it here, not there). The device tool carries at most 64 MiB with the tree, and Ray's wheel alone is
# 79 MB: the bundle leaves out Ray's Java jars, the dashboard's source maps, RLlib and Ray LLM, and MLflow's web UI,
# none of which a cell loads; xz then packs 271 MB into 43 MB where the wheels' zip packs ~75 MB.
#   bash bench/gpu_bundle.sh   # -> .gpu/site.tar.xz and its size
set -euo pipefail
# deepspeed's setup.py imports torch: build with the project's venv (scripts/setup.sh)
cd "$(dirname "$0")/.."
PY_VERSION=${GPU_PYTHON_VERSION:-3.12}
LIMIT_MB=${GPU_BUNDLE_LIMIT_MB:-56}  # 64 MiB less the working tree (~2 MB) and headroom
TAG=cp${PY_VERSION/./}
[ -f .venv/bin/activate ] && . .venv/bin/activate
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p .gpu "$work/wheels" "$work/site"
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64)
SDIST_ONLY="deepspeed|rouge-score"  # PyPI holds no wheel of these
grep -v '^#' bench/gpu_wheels.txt | grep -Ev "^($SDIST_ONLY)==" > "$work/binary.txt"
python -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
  "${PLATFORMS[@]}" -d "$work/wheels" -r "$work/binary.txt"
for pin in $(grep -E "^($SDIST_ONLY)==" bench/gpu_wheels.txt); do
  DS_BUILD_OPS=0 python -m pip wheel -q --no-deps --no-build-isolation -w "$work/wheels" "$pin"  # pure Python
done
python -m pip install -q --no-deps --no-compile --target "$work/site" --python-version "$PY_VERSION" \
  --implementation cp "${PLATFORMS[@]}" --only-binary=:all: "$work"/wheels/*.whl
# What no cell loads (see the header); each folder is checked to exist, so a renamed one fails the build.
for unused in ray/jars ray/rllib ray/llm mlflow/server/js; do
  test -d "$work/site/$unused" || { echo "bundle.sh: $unused is gone from the wheels; update the list" >&2; exit 1; }
  rm -r "${work:?}/site/$unused"
done
find "$work/site" -name '*.js.map' -delete
rm -rf "$work/site/bin"  # console scripts with this machine's interpreter path
cat > "$work/site/moelab_bundle.json" <<JSON
{"python": "$PY_VERSION", "tag": "$TAG", "built": "$(date -u +%FT%TZ)",
 "modules": ["ray", "ray.train", "ray.tune", "mlflow", "mlflow.store.tracking.sqlalchemy_store", "deepspeed",
             "datasets", "evaluate", "pydantic", "optuna", "rouge_score", "sqlalchemy", "alembic"]}
JSON
XZ_OPT=-9 tar -cJf .gpu/site.tar.xz -C "$work/site" .
size_mb=$(( $(stat -c %s .gpu/site.tar.xz) / 1000000 ))
echo ".gpu/site.tar.xz: ${size_mb} MB ($(du -sm "$work/site" | cut -f1) MB unpacked, $(ls "$work/wheels" | wc -l) wheels)"
if [ "$size_mb" -gt "$LIMIT_MB" ]; then
  echo "bundle.sh: ${size_mb} MB is over ${LIMIT_MB} MB; the tree and the bundle must travel in 64 MiB" >&2
  exit 1
fi
