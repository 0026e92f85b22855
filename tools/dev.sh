#!/usr/bin/env bash
# dlarch developer commands. Needs only Python 3.10+ (and npm for the offline MathJax copy).
#   bash tools/dev.sh setup   create .venv, install pinned requirements + dlarch_lib, vendor MathJax
#   bash tools/dev.sh book    setup, then execute every notebook and build the site into _build/html
#   bash tools/dev.sh assign  setup, course assignments (student + autograder material) -> _assign/,
#                             and the student edition of the website -> _student/_build/html
#   bash tools/dev.sh full    every chapter at DLARCH_SIZE=full in the Colab-like environment (hours on
#                             a CPU) -> _build/full/{executed,timings}
#   bash tools/dev.sh test    setup, lint + types (ruff, mypy), library tests, nbval over every notebook in
#                             a Colab-like Python 3.13 + torch 2.11 environment (executed once: the
#                             websites render that execution; timing table), assignments generated
#                             and graded three ways, zero-warning site build, student edition,
#                             checks of both built sites; ends with the table of its phases
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
VENV=$ROOT/.venv
COLAB_VENV=$ROOT/.venv-colab   # the readers' runtime (requirements-colab.txt), where the notebooks run
COLAB_PY=${DLARCH_COLAB_PYTHON:-python3.13}
MATHJAX_VERSION=3.2.2
export PYDEVD_DISABLE_FILE_VALIDATION=1   # silence debugpy's frozen-modules note in kernels
# Do not export MPLBACKEND: kernels would inherit it and ipykernel would then skip its inline
# backend, so plt.show() would put no figure on the page. Headless matplotlib picks Agg itself.
unset MPLBACKEND

log() { printf '\n==> %s\n' "$*"; }

setup() {
  if [ ! -x "$VENV/bin/python" ]; then
    log "creating virtual environment .venv"
    "$PY" -m venv "$VENV"
  fi
  # shellcheck disable=SC1091
  . "$VENV/bin/activate"
  local stamp="$VENV/.dlarch-installed"
  if [ ! -f "$stamp" ] || [ requirements.txt -nt "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    log "installing pinned requirements and dlarch_lib (editable)"
    python -m pip install -q --upgrade pip
    python -m pip install -q -r requirements.txt
    python -m pip install -q --no-deps -e .
    touch "$stamp"
  fi
  if [ ! -f _vendor/mathjax/tex-mml-chtml.js ]; then
    vendor_mathjax
  fi
}

vendor_mathjax() {
  # MathJax 3 (not 4: v4 fetches its fonts from a CDN) copied into _vendor/mathjax, which the
  # site serves itself (html_extra_path). From the npm package; without npm, from the same
  # MathJax 3.2.2 files bundled in the PyPI package sphinx-mathjax-offline.
  log "vendoring MathJax $MATHJAX_VERSION so the site needs no CDN"
  local tmp dst=_vendor/mathjax; tmp=$(mktemp -d)
  rm -rf "$dst"; mkdir -p "$dst"
  if command -v npm >/dev/null; then
    (cd "$tmp" && npm pack --silent "mathjax@$MATHJAX_VERSION" >/dev/null && tar xzf "mathjax-$MATHJAX_VERSION.tgz")
    local src=$tmp/package/es5
    mkdir -p "$dst/output/chtml/fonts" "$dst/input/tex"
    cp "$src/tex-mml-chtml.js" "$dst/"
    cp -r "$src/output/chtml/fonts/woff-v2" "$dst/output/chtml/fonts/"
    cp -r "$src/input/tex/extensions" "$dst/input/tex/"
    cp -r "$src/ui" "$src/a11y" "$dst/"
  else
    python -m pip download -q --no-deps -d "$tmp" sphinx-mathjax-offline==0.0.2
    python -m zipfile -e "$tmp"/sphinx_mathjax_offline-*.whl "$tmp/whl"
    cp -r "$tmp/whl/sphinx-mathjax-offline/static/mathjax/." "$dst/"
  fi
  rm -rf "$tmp"
  test -f "$dst/tex-mml-chtml.js"
}

# Each phase of the test command is timed; the table is printed at the end (also when a phase
# fails) and written to _build/timings/phases.csv. Every phase also has an overall time limit
# (`timeout`): the tests and cells inside it have their own, shorter ones (pyproject.toml, nbval).
PHASES=()
phase() {  # phase NAME LIMIT_S COMMAND...: run COMMAND as one timed phase of at most LIMIT_S seconds
  local name=$1 limit=$2; shift 2
  local start=$SECONDS rc=0
  log "$name"
  timeout --kill-after=30 "$limit" "$@" || rc=$?
  PHASES+=("$name|$((SECONDS - start))|$([ $rc = 0 ] && echo ok || { [ $rc = 124 ] && echo "TIMED OUT after $limit s" || echo "failed (exit $rc)"; })")
  # written after every phase: the website (built in a later phase) shows the phases before it
  mkdir -p _build/timings
  { echo "phase,seconds,status"; for row in "${PHASES[@]}"; do echo "${row//|/,}"; done; } > _build/timings/phases.csv
  return $rc
}

phase_table() {
  [ ${#PHASES[@]} -gt 0 ] || return 0
  local total=0 row name secs status
  printf '\n==> phases of the test command (seconds)\n'
  total=0
  for row in "${PHASES[@]}"; do
    IFS='|' read -r name secs status <<< "$row"; total=$((total + secs))
    printf '  %-16s %6s s  %s\n' "$name" "$secs" "$status"
  done
  printf '  %-16s %6s s  (budget 1800 s)\n' "total" "$total"
}

build_book() {
  # The notebooks execute into the jupyter-cache _build/.jupyter_cache, which the student edition
  # reuses. The cache keys on the notebooks' code only, so start it afresh (a changed dlarch_lib
  # must show on the page) unless DLARCH_KEEP_CACHE=1.
  [ "${DLARCH_KEEP_CACHE:-0}" = 1 ] || rm -rf _build/.jupyter_cache
  # one torch thread per notebook, as under nbval: the site shows the run the tests checked
  DLARCH_THREADS=${DLARCH_THREADS:-1} jupyter-book build . --all -W --keep-going
}

setup_colab() {
  # .venv-colab: Python 3.13 with Colab's packages (requirements-colab.txt) and the test tools, and
  # no dlarch_lib: each run removes it, so the chapters' setup cells install it as on Colab.
  if [ ! -x "$COLAB_VENV/bin/python" ]; then
    if ! "$COLAB_PY" --version >/dev/null 2>&1; then  # e.g. a pyenv shim for a version not selected
      local found; found=$(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.13*/bin/python 2>/dev/null | tail -1 || true)
      [ -n "$found" ] && COLAB_PY=$found
    fi
    if ! "$COLAB_PY" --version >/dev/null 2>&1; then
      echo "ERROR: $COLAB_PY not found: the notebooks must run in Colab's Python 3.13 (set DLARCH_COLAB_PYTHON)" >&2
      return 1
    fi
    log "creating the Colab-like environment .venv-colab ($("$COLAB_PY" --version))"
    "$COLAB_PY" -m venv "$COLAB_VENV"
  fi
  local stamp="$COLAB_VENV/.dlarch-installed"
  if [ ! -f "$stamp" ] || [ requirements-colab.txt -nt "$stamp" ]; then
    log "installing Colab's packages (requirements-colab.txt) into .venv-colab"
    "$COLAB_VENV/bin/python" -m pip install -q --upgrade pip
    "$COLAB_VENV/bin/python" -m pip install -q -r requirements-colab.txt
    touch "$stamp"
  fi
  "$COLAB_VENV/bin/python" -m pip uninstall -q -y dlarch_lib 2>/dev/null || true
}

run_notebooks() {
  # nbval executes every notebook once, in the Colab-like environment (tests/nbrun.py keeps the
  # outputs in _build/executed and writes the timing table); the executed notebooks then go into
  # the website's cache. The first chapter runs alone: its setup cell installs dlarch_lib (from
  # $DLARCH_SOURCE, this checkout), which two kernels must not do at once; the rest run two at a time.
  setup_colab
  rm -rf _build/executed _build/.jupyter_cache _build/timings/notebooks.csv
  local first=book/01_formal_definition.ipynb rest
  rest=$(ls book/*.ipynb | grep -v "^$first$")
  export DLARCH_SOURCE=$ROOT DLARCH_THREADS=1 DLARCH_NB_APPEND=1
  "$COLAB_VENV/bin/python" -m pytest --nbval-lax --nbval-current-env -q -rs "$first"
  # shellcheck disable=SC2086
  "$COLAB_VENV/bin/python" -m pytest -n 2 --dist loadfile --nbval-lax --nbval-current-env -q -rs $rest
  python tools/nb.py cache-executed
}

run_full() {
  # every chapter at DLARCH_SIZE=full, in the readers' runtime, two at a time, into _build/full
  # (executed notebooks and the timing table; not the website's). It takes hours on a CPU: no
  # per-notebook wall-time failure, 3 hours per cell. A reader's GPU runs the same size.
  setup_colab
  rm -rf _build/full
  local first=book/01_formal_definition.ipynb rest
  rest=$(ls book/*.ipynb | grep -v "^$first$")
  export DLARCH_SOURCE=$ROOT DLARCH_THREADS=${DLARCH_THREADS:-1} DLARCH_NB_APPEND=1 DLARCH_SIZE=full \
    DLARCH_EXECUTED_DIR=$ROOT/_build/full/executed DLARCH_TIMINGS_DIR=$ROOT/_build/full/timings \
    DLARCH_NB_BUDGET_S=180 DLARCH_NB_FAIL_S=100000
  local opts=(--nbval-lax --nbval-current-env -q -rs --nbval-cell-timeout=10800 -o timeout=21600)
  "$COLAB_VENV/bin/python" -m pytest "${opts[@]}" "$first" || true
  # shellcheck disable=SC2086
  "$COLAB_VENV/bin/python" -m pytest -n "${DLARCH_FULL_WORKERS:-2}" --dist loadfile "${opts[@]}" $rest
}

run_assignments() {
  # tests/test_assignments.py also runs a hand-out alone in the readers' runtime: a fresh environment
  # on top of .venv-colab (made here if the notebooks phase has not), where the hand-out's first cell
  # installs otter-grader (from the registry, pinned; the pip cache keeps it) and grader.check runs
  [ -x "$COLAB_VENV/bin/python" ] || setup_colab
  python tools/assign.py generate
  DLARCH_THREADS=1 DLARCH_ASSIGN_DIR="$ROOT/_assign" DLARCH_COLAB_VENV="$COLAB_VENV" \
    python -m pytest -n 2 -q -rs --durations=3 tests/test_assignments.py
}

build_site_from_cache() {
  # renders the executed notebooks from the cache (a chapter missing there would be executed,
  # which check-cached reports as an error)
  DLARCH_THREADS=1 jupyter-book build . --all -W --keep-going
  python tools/nb.py check-cached
}

run_lint() {
  # the library, tests and tools: lint, formatting and types (configuration in pyproject.toml)
  ruff check .
  ruff format --check .
  mypy
}

run_library_tests() {
  DLARCH_THREADS=1 python -m pytest -n 2 --dist loadfile -q -rs \
    --ignore=tests/site --ignore=tests/test_assignments.py tests
}

run_tests() {
  # each phase is this script again (a subcommand below), so that `timeout` can bound it
  trap phase_table EXIT
  local me=$ROOT/tools/dev.sh
  phase "install" 900 bash "$me" setup
  phase "lint and types" 300 bash "$me" lint
  phase "library tests" 900 bash "$me" library-tests
  phase "notebooks" 1200 bash "$me" notebooks
  phase "assignments" 1200 bash "$me" assignments
  phase "site" 900 bash "$me" site
  phase "student site" 600 bash "$me" student-site
  phase "site checks" 600 bash "$me" site-checks
}

case "${1:-}" in
  setup) setup ;;
  book) setup; build_book ;;
  assign) setup; python tools/assign.py generate; python tools/assign.py site ;;
  test) run_tests ;;
  # the phases of `test`, one by one (each expects the previous ones to have run)
  lint) setup; run_lint ;;
  library-tests) setup; run_library_tests ;;
  notebooks) setup; run_notebooks ;;
  full) setup; run_full ;;
  assignments) setup; run_assignments ;;
  site) setup; build_site_from_cache ;;
  student-site) setup; DLARCH_THREADS=1 python tools/assign.py site ;;
  site-checks) setup; DLARCH_REQUIRE_SITE=1 python -m pytest -q -rs tests/site ;;
  *) echo "usage: bash tools/dev.sh {setup|book|assign|test|full|lint|library-tests|notebooks|assignments|site|student-site|site-checks}"; exit 2 ;;
esac
