#!/usr/bin/env bash
# Record the GPU cells: every chapter at DLARCH_SIZE=full on a machine with one CUDA GPU.
#
#   bash tools/gpu.sh download             here, where the package registry is reachable: the wheels
#                                          of tools/gpu_wheels.txt (what the GPU machine's Python 3.12
#                                          lacks) -> .whl/, which git ignores (.git/info/exclude)
#   bash tools/gpu.sh [run] [CHAPTER...]   there (python3 with torch and CUDA, no network, .whl/
#                                          carried beside the checkout): every chapter, or those named,
#                                          under nbval -> $OUT/gpu_run.tar.gz and $OUT/gpu.log
#   python tools/nb.py record-gpu gpu_run.tar.gz
#                                          here again: the outputs of the cells the GPU could run
#                                          (requires-cuda) -> book/, the timing table ->
#                                          _static/gpu_timings.csv (the execution statistics page)
#
# The run installs the carried wheels into a temporary folder and puts it and this checkout on
# PYTHONPATH (tools/nb.py gpu-distinfo writes dlarch_lib's metadata there, which dl.require reads).
# It executes the chapters as the test command does (nbval, --nbval-lax, tests/nbrun.py keeps the
# outputs and each chapter's time and verdict) but at size "full", DLARCH_GPU_WORKERS at a time
# (pytest-xdist) with DLARCH_GPU_THREADS torch threads each; the chapters with GPU cells go first,
# and each gated cell runs while no other cell does (DLARCH_GATED_ALONE_DIR, tests/nbrun.py), so
# that what it records is the GPU alone. A cell has DLARCH_GPU_CELL_S seconds; the whole command,
# wheels and packing included, ends within DLARCH_GPU_TOTAL_S (the chapters get what is left after
# setting up, less a minute: at the limit pytest is interrupted, and the chapters it did not finish
# are reported as such in the table). The archive holds executed/book/*.ipynb, gpu_run.json (GPU,
# driver, torch, CUDA, date, the gating tags whose hardware was present), gpu_timings.csv (per
# chapter: wall time, outcome, GPU, torch, CUDA, date) and nbrun's timings/. Exit status 0 when
# every chapter passed; the archive is written either way.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
WHEELS=${DLARCH_GPU_WHEELS:-$ROOT/.whl}   # the carried wheels
WHEEL_LIST=tools/gpu_wheels.txt
# the GPU machine: Python 3.12 on x86-64 Linux (pip matches manylinux_2_N exactly: name each N)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_26_x86_64 manylinux_2_24_x86_64
  manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_5_x86_64 manylinux1_x86_64)
TOTAL_S=${DLARCH_GPU_TOTAL_S:-530}
WORKERS=${DLARCH_GPU_WORKERS:-6}
THREADS=${DLARCH_GPU_THREADS:-2}
CELL_S=${DLARCH_GPU_CELL_S:-300}
OUT_DIR=${OUT:-$ROOT/_build/gpu}
MAX_ARCHIVE=${DLARCH_GPU_MAX_ARCHIVE:-$((15 * 1024 * 1024))}   # what comes back from the machine: 16 MiB a file at most

log() { printf '\n==> %s\n' "$*"; }
die() { echo "ERROR: $*" >&2; exit 2; }

download() {
  local exclude platform args=()
  exclude=$(git rev-parse --git-path info/exclude)
  mkdir -p "$(dirname "$exclude")"
  grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
  rm -rf "$WHEELS"   # one version of each package: two would stop the install there
  mkdir -p "$WHEELS"
  for platform in "${PLATFORMS[@]}"; do args+=(--platform "$platform"); done
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${args[@]}" -d "$WHEELS" -r "$WHEEL_LIST"
  echo "$(find "$WHEELS" -type f -name '*.whl' | wc -l) wheels ($(du -sh "$WHEELS" | cut -f1)) in .whl/: carry .whl to the GPU machine"
}

run() {
  local start=$SECONDS work rc=0 limit chapters=() parallel=() timed=()
  work=$(cd "$(mktemp -d "${TMPDIR:-/tmp}/dlarch-gpu.XXXXXX")" && pwd -P)
  mkdir -p "$work/site" "$work/run" "$work/locks" "$work/tmp"

  log "setting up ($(nproc) cores; wheels from .whl/ into $work/site)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  if compgen -G "$WHEELS/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$work/site" "$WHEELS"/*.whl
  fi
  export PYTHONPATH="$work/site:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
  "$PY" tools/nb.py gpu-distinfo "$work/site" >/dev/null
  "$PY" -c 'import nbval, nbformat, ipykernel' ||
    die "nbval, nbformat or ipykernel missing: run 'bash tools/gpu.sh download' where pip works and carry .whl"
  "$PY" -c 'import optuna' 2>/dev/null || echo "WARNING: no optuna: chapter 17 will fail (carry the wheels)"
  "$PY" tools/nb.py gpu-info "$work/run/gpu_run.json"   # exits without a CUDA GPU
  cat "$work/run/gpu_run.json"
  mapfile -t chapters < <("$PY" tools/nb.py gpu-order "$@")
  [ "${#chapters[@]}" -gt 0 ] || die "no chapters to run"
  if [ "$WORKERS" -gt 1 ] && "$PY" -c 'import xdist' 2>/dev/null; then
    parallel=(-n "$WORKERS" --dist loadfile)
  else
    echo "one chapter at a time (DLARCH_GPU_WORKERS=$WORKERS, or no pytest-xdist)"
  fi

  export DLARCH_SIZE=full DLARCH_THREADS=$THREADS DLARCH_SOURCE=$ROOT \
    DLARCH_EXECUTED_DIR=$work/run/executed DLARCH_TIMINGS_DIR=$work/run/timings \
    DLARCH_NB_BUDGET_S=180 DLARCH_NB_FAIL_S=100000 DLARCH_GATED_ALONE_DIR=$work/locks \
    XLA_PYTHON_CLIENT_PREALLOCATE=false PYDEVD_DISABLE_FILE_VALIDATION=1 JUPYTER_PLATFORM_DIRS=1 \
    TMPDIR=$work/tmp PYTHONUNBUFFERED=1   # the kernels' connection files, the chapters' temporary files
  unset MPLBACKEND   # ipykernel's inline backend, so that figures reach the outputs
  limit=$((TOTAL_S - (SECONDS - start) - 60))
  [ "$limit" -ge 60 ] || die "only $limit s left for the chapters (DLARCH_GPU_TOTAL_S=$TOTAL_S)"
  log "${#chapters[@]} chapters at size full, ${WORKERS} at a time with ${THREADS} threads each, within $limit s"
  # at the limit: SIGINT, so that pytest ends its session (nbrun's table); SIGKILL 20 s later
  timeout -s INT -k 20 "$limit" "$PY" -m pytest "${parallel[@]}" --nbval-lax --nbval-current-env -v -rs \
    --nbval-cell-timeout="$CELL_S" -o timeout=$((2 * CELL_S + 60)) "${chapters[@]}" || rc=$?
  # the kernels of chapters cut at the limit (started with a connection file in $work/tmp) stop now
  pkill -KILL -f -- "$work/tmp/" 2>/dev/null || true
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    timed=(--timed-out)
    echo "stopped at the time limit ($limit s)"
  fi

  log "GPU timing table (wall time per chapter, seconds)"
  "$PY" tools/nb.py gpu-summary "${timed[@]}" "$work/run" "${chapters[@]}" || echo "WARNING: no GPU timing table"
  pack "$work/run" "${chapters[@]}"
  rm -rf "$work"
  log "done in $((SECONDS - start)) s: $OUT_DIR/gpu_run.tar.gz; next, where the checkout is committed from:"
  echo "   python tools/nb.py record-gpu gpu_run.tar.gz"
  [ "$rc" = 0 ]
}

pack() {  # pack RUN_DIR CHAPTER...: the run's files -> one archive in $OUT_DIR, under its size limit
  local run_dir=$1 archive=$OUT_DIR/gpu_run.tar.gz chapter kept=()
  shift
  tar -czf "$archive" -C "$run_dir" .
  if [ "$(stat -c %s "$archive")" -gt "$MAX_ARCHIVE" ]; then
    echo "the archive is over $((MAX_ARCHIVE >> 20)) MiB: only the executed chapters with GPU cells stay in it"
    while read -r chapter; do
      if [ -f "$run_dir/executed/$chapter" ]; then kept+=("executed/$chapter"); fi
    done < <("$PY" tools/nb.py gpu-order --gated "$@")
    tar -czf "$archive" -C "$run_dir" gpu_run.json gpu_timings.csv "${kept[@]}" \
      $([ -d "$run_dir/timings" ] && echo timings)
  fi
  ls -l "$archive"
}

case "${1:-run}" in
  download) download ;;
  run | *.ipynb)
    if [ "${1:-}" = run ]; then shift; fi
    mkdir -p "$OUT_DIR"
    run "$@" 2>&1 | tee "$OUT_DIR/gpu.log"
    ;;
  *) echo "usage: bash tools/gpu.sh {download|run [book/NN_slug.ipynb ...]}"; exit 2 ;;
esac
