#!/usr/bin/env bash
# dlarch developer commands. Needs only Python 3.10+ (and npm for the offline MathJax copy).
#   bash tools/dev.sh setup   create .venv, install pinned requirements + dlarch_lib, vendor MathJax
#   bash tools/dev.sh book    setup, then execute every notebook and build the site into _build/html
#   bash tools/dev.sh assign  setup, course assignments (student + autograder material) -> _assign/,
#                             and the student edition of the website -> _student/_build/html
#   bash tools/dev.sh test    setup, library tests + nbval over every notebook (timing table),
#                             assignments generated and graded three ways, zero-warning site build,
#                             student edition, checks of both built sites
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
VENV=$ROOT/.venv
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

build_book() {
  log "building the website (executes every notebook) -> _build/html"
  local start=$SECONDS
  # The notebooks execute into the jupyter-cache _build/.jupyter_cache, which the student edition
  # reuses. The cache keys on the notebooks' code only, so start it afresh (a changed dlarch_lib
  # must show on the page) unless DLARCH_KEEP_CACHE=1.
  [ "${DLARCH_KEEP_CACHE:-0}" = 1 ] || rm -rf _build/.jupyter_cache
  # one torch thread per notebook, as under nbval: the site shows the run the tests checked
  if ! DLARCH_THREADS=${DLARCH_THREADS:-1} jupyter-book build . --all -W --keep-going; then
    # A failed notebook is not cached, so this second build re-executes only the notebooks that
    # failed (a timing assert disturbed by a shared machine); any other warning fails it again.
    log "site build failed: building once more, re-executing only the notebooks that failed"
    DLARCH_THREADS=${DLARCH_THREADS:-1} jupyter-book build . --all -W --keep-going
  fi
  echo "site build: $((SECONDS - start)) s"
}

run_tests() {
  log "library tests, notebook hygiene and nbval over every notebook (2 workers, 1 thread each)"
  local nbval=(python -m pytest -n 2 --dist loadfile --nbval-lax --nbval-current-env -rs)
  if ! DLARCH_THREADS=1 "${nbval[@]}" --ignore=tests/site --ignore=tests/test_assignments.py tests book; then
    # Timing asserts on a shared two-core machine can be disturbed. A notebook that failed is run
    # once more, whole; a failed library test, or a notebook that fails twice, fails the run.
    local failed
    failed=$(python tools/failed_notebooks.py) || exit 1
    log "notebooks that failed, run once more: $failed"
    # shellcheck disable=SC2086
    DLARCH_THREADS=1 DLARCH_NB_RERUN=1 "${nbval[@]}" $failed
  fi
  log "course assignments: generate, then grade reference (full marks), stub (zero) and wrong answers"
  local start=$SECONDS
  python tools/assign.py generate
  DLARCH_THREADS=1 DLARCH_ASSIGN_DIR="$ROOT/_assign" python -m pytest -n 2 -q -rs --durations=3 tests/test_assignments.py
  echo "assignments generated and graded: $((SECONDS - start)) s"
  build_book
  build_student_site
  log "checks of the built sites"
  DLARCH_REQUIRE_SITE=1 python -m pytest -q -rs tests/site
}

build_student_site() {
  log "building the student edition of the website (solutions hidden) -> _student/_build/html"
  local start=$SECONDS
  DLARCH_THREADS=${DLARCH_THREADS:-1} python tools/assign.py site
  echo "student site build: $((SECONDS - start)) s"
}

case "${1:-}" in
  setup) setup ;;
  book) setup; build_book ;;
  assign) setup; python tools/assign.py generate; build_student_site ;;
  test) setup; run_tests ;;
  *) echo "usage: bash tools/dev.sh {setup|book|assign|test}"; exit 2 ;;
esac
