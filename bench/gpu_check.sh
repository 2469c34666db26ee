#!/usr/bin/env bash
# The GPU check (issue 42): one call on the lent GPU machine runs the CUDA tests, the layer and step benchmarks and
# whole cells of a study, and leaves every result in $OUT. Device time is scarce (15 minutes a session, start-up
# included), so the script is rehearsed on CPU first and each step is bounded by what is left of --budget.
#
#   bash bench/gpu_bundle.sh                 # here, once: .gpu/site.tar.xz (Ray, MLflow, DeepSpeed, ... for cp312)
#   bash bench/gpu_check.sh --dry-run        # here: everything but the CUDA work (the suite runs this too)
#   run(command="bash bench/gpu_check.sh", carry=[".gpu"], timeout_s=540)   # there: one call
#
# Steps, in order of value (a step that would outrun the budget is skipped and says so):
#   install     unpack the bundle into a fresh folder on PYTHONPATH; import what it holds
#   env         the device, driver, torch and the bundle's versions
#   cuda_tests  tests/workflows/test_cells_on_cuda.py and tests/moe_models/test_grouped_cuda.py
#   moe_layer   bench/moe_layer.py at the headline shapes, eager and compiled, grouped vs DeepSpeed vs dense
#   study       moelab run studies/gpu_smoke.yaml (4 cells, bf16, one at a time) and its aggregate table
#   model_step  bench/model_step.py --eager-and-compiled, the 8-layer Mixtral-style step against its dense twin
#   compiled    moelab run studies/gpu_smoke_compiled.yaml (the top-2 cell, torch.compile'd)
# --dry-run replaces the CUDA work by what checks it without a GPU: test collection, the benchmarks' --dry-run
# (argument typos, contender names, shapes), `moelab validate` of both studies; install, env and the output layout
# run as they do there.
#
# $OUT (the device tool brings back at most 8 files): summary.json (every step: status, seconds, log tail),
# steps.log, cuda_tests.log, study.log, study_table.md, moe_layer.json, model_step.json.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

DRY_RUN=0
OUT_DIR=${OUT:-$REPO/gpu_check_out}
BUNDLE=$REPO/.gpu/site.tar.xz
PY=python3
BUDGET=480
usage() { sed -n '2,8p' "$0" >&2; echo "options: --dry-run --out DIR --bundle FILE --python PY --budget SECONDS" >&2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --out) OUT_DIR=$2; shift ;;
    --bundle) BUNDLE=$2; shift ;;
    --python) PY=$2; shift ;;
    --budget) BUDGET=$2; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1" >&2; usage; exit 2 ;;
  esac
  shift
done
case "$BUDGET" in ''|*[!0-9]*) echo "gpu_check.sh: --budget takes whole seconds, not '$BUDGET'" >&2; exit 2 ;; esac
[ -f "$BUNDLE" ] || { echo "gpu_check.sh: no bundle at $BUNDLE (bash bench/gpu_bundle.sh builds it)" >&2; exit 2; }
command -v "$PY" > /dev/null || { echo "gpu_check.sh: no python '$PY'" >&2; exit 2; }

mkdir -p "$OUT_DIR"
WORK=$(mktemp -d)  # the studies' workdirs, the unpacked bundle: nothing of it belongs in $OUT
trap 'rm -rf "$WORK"' EXIT
STEPS=$WORK/steps.tsv
: > "$STEPS"
LOG=$OUT_DIR/steps.log
: > "$LOG"
START=$SECONDS
export PYTHONUNBUFFERED=1 WORK OUT_DIR BUNDLE PY REPO

# step NAME LOGFILE MAX_SECONDS CMD...: runs CMD under the smaller of MAX_SECONDS and what the budget has left,
# appends its output to LOGFILE, and records name, status and seconds.
step() {
  local name=$1 log=$2 max=$3; shift 3
  local left=$(( BUDGET - (SECONDS - START) ))
  local limit=$(( max < left ? max : left ))
  if [ "$limit" -lt 20 ]; then
    printf '%s\tskipped\t0\tbudget spent (%ss left)\n' "$name" "$left" >> "$STEPS"
    return 0
  fi
  echo "=== $name (limit ${limit}s): $*" >> "$log"
  local t0=$SECONDS
  # through bash -c: a step may be one of this script's functions (exported below)
  timeout --kill-after=15 "$limit" bash -c '"$@"' _ "$@" >> "$log" 2>&1
  local rc=$?
  local status=ok
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && status=timeout
  [ $rc -ne 0 ] && [ "$status" = ok ] && status="failed rc=$rc"
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$(( SECONDS - t0 ))" "$log" >> "$STEPS"
  echo "=== $name: $status in $(( SECONDS - t0 ))s" >> "$log"
  return 0
}

install_bundle() {
  mkdir -p "$WORK/site" && tar -xJf "$BUNDLE" -C "$WORK/site" || return 1
  PYTHONPATH=$WORK/site:$REPO "$PY" - "$WORK/site/moelab_bundle.json" <<'PYCODE'
import importlib, json, sys
bundle = json.load(open(sys.argv[1]))
here = "%d.%d" % sys.version_info[:2]
if bundle["python"] != here:  # a cp312 bundle cannot load its compiled modules on another Python (the CPU rehearsal)
    print(f"bundle built for Python {bundle['python']}, this is {here}: not used, imports not checked")
    sys.exit(0)
for name in bundle["modules"]:
    module = importlib.import_module(name)
    print(f"{name} {getattr(module, '__version__', '')} from {module.__file__}")
open(sys.argv[1].replace("moelab_bundle.json", ".usable"), "w").close()
PYCODE
}

environment() {
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 || echo "nvidia-smi: none here"
  # the image's torch and transformers, not CI's pins (torch 2.13, transformers 5.23): the log says which ran
  "$PY" -c "import sys, torch, transformers; print('python', sys.version.split()[0], 'torch', torch.__version__,
'transformers', transformers.__version__, 'cuda', torch.version.cuda,
'device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
  nproc; free -g | head -2
}

moelab() { "$PY" -m workflows.driver.cli "$@"; }
export MOE_SHAPES="16384,1024,4096,8,2;16384,1024,1024,32,4"  # the headline shapes (targets 1.3x and 2x dense)
STEP_ARGS=(--only dense topk/grouped --eager-and-compiled)  # 8 layers, d 1024, 8 experts of 4096 (target 1.25x)

export -f install_bundle environment moelab
step install "$LOG" 120 install_bundle
# workers Ray starts inherit it; a bundle for another Python (the CPU rehearsal) would shadow this one's packages
[ -f "$WORK/site/.usable" ] && SITE="$WORK/site:" || SITE=
export PYTHONPATH=$SITE$REPO${PYTHONPATH:+:$PYTHONPATH}
step env "$LOG" 60 environment

if [ $DRY_RUN -eq 1 ]; then
  step cuda_tests "$OUT_DIR/cuda_tests.log" 120 "$PY" -m pytest -q -p no:cacheprovider --collect-only \
    tests/workflows/test_cells_on_cuda.py tests/moe_models/test_grouped_cuda.py
  step moe_layer "$LOG" 120 "$PY" bench/moe_layer.py --dry-run --device cuda --dtype bf16 \
    --backends grouped deepspeed --shapes "$MOE_SHAPES" --out "$OUT_DIR/moe_layer.json"
  step study "$OUT_DIR/study.log" 120 moelab validate studies/gpu_smoke.yaml
  step model_step "$LOG" 120 "$PY" bench/model_step.py --dry-run --device cuda "${STEP_ARGS[@]}" \
    --out "$OUT_DIR/model_step.json"
  step compiled "$OUT_DIR/study.log" 120 moelab validate studies/gpu_smoke_compiled.yaml
  echo "dry run: no table" > "$OUT_DIR/study_table.md"
else
  step cuda_tests "$OUT_DIR/cuda_tests.log" 150 "$PY" -m pytest -q -p no:cacheprovider --durations=15 \
    tests/workflows/test_cells_on_cuda.py tests/moe_models/test_grouped_cuda.py
  moe_layer_both() {  # eager and compiled in one JSON (the device tool brings back 8 files at most)
    "$PY" bench/moe_layer.py --device cuda --dtype bf16 --backends grouped deepspeed --shapes "$MOE_SHAPES" \
      --out "$WORK/moe_eager.json" > /dev/null || return 1
    "$PY" bench/moe_layer.py --device cuda --dtype bf16 --backends grouped --shapes "$MOE_SHAPES" --compile \
      --out "$WORK/moe_compiled.json" > /dev/null  # a failed compile keeps the eager numbers (compiled: null)
    "$PY" -c "import json, os, sys
read = lambda path: json.load(open(path)) if os.path.exists(path) else None
json.dump({'eager': read(sys.argv[1]), 'compiled': read(sys.argv[2])}, open(sys.argv[3], 'w'), indent=2)" \
      "$WORK/moe_eager.json" "$WORK/moe_compiled.json" "$OUT_DIR/moe_layer.json"
  }
  smoke() {
    moelab run "studies/$1.yaml" --workdir "$WORK/$1" || return 1
    { echo "## $1"; echo; moelab aggregate "studies/$1.yaml" --workdir "$WORK/$1" --format md; echo; } \
      >> "$OUT_DIR/study_table.md"
  }
  export -f moe_layer_both smoke
  step moe_layer "$LOG" 120 moe_layer_both
  step study "$OUT_DIR/study.log" 300 smoke gpu_smoke
  step model_step "$LOG" 150 "$PY" bench/model_step.py "${STEP_ARGS[@]}" --out "$OUT_DIR/model_step.json"
  step compiled "$OUT_DIR/study.log" 150 smoke gpu_smoke_compiled
fi

"$PY" - "$STEPS" "$OUT_DIR" "$DRY_RUN" "$BUNDLE" "$(( SECONDS - START ))" <<'PYCODE'
import json, os, sys
steps_file, out_dir, dry_run, bundle, seconds = sys.argv[1:]
steps = []
for line in open(steps_file):
    name, status, took, where = line.rstrip("\n").split("\t")
    if os.path.isfile(where):  # this step's own block of its log, which other steps may share
        block = open(where).read().split(f"=== {name} (")[-1].split(f"\n=== {name}: ")[0]
        tail = block.splitlines()[1:][-15:]
    else:
        tail = [where]
    steps.append({"step": name, "status": status, "seconds": int(took), "log_tail": tail})
json.dump({"dry_run": dry_run == "1", "bundle_mb": round(os.path.getsize(bundle) / 1e6, 1),
           "wall_seconds": int(seconds), "steps": steps}, open(os.path.join(out_dir, "summary.json"), "w"), indent=2)
print("\n".join(f"{s['step']:<11} {s['status']:<14} {s['seconds']:>4}s" for s in steps))
sys.exit(0 if all(s["status"] == "ok" for s in steps) else 1)
PYCODE
