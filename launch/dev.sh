#!/usr/bin/env bash
# Sets up .venv (once) and runs the demo or the tests.
#   bash launch/dev.sh demo     the main job on a generated small model (CPU)
#   bash launch/dev.sh test     lint, then the test suite (CPU; GPU tests are skipped without CUDA)
#   bash launch/dev.sh setup    only the set-up
# Afterwards: `source .venv/bin/activate` (then `offload-dist ...`, `python -c "import offload_dist"`),
# or call `.venv/bin/offload-dist` and `.venv/bin/python` directly.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
say() { printf '==> %s\n' "$*" >&2; }

if [ ! -x .venv/bin/python ]; then
    say "creating .venv with $($PY --version 2>&1)"
    "$PY" -m venv .venv
fi
# torch is pinned to the CPU build on CPU-only machines; on a GPU machine install the
# CUDA build of torch first (any version >= 2.6) and it is kept.
if ! .venv/bin/python -c "import offload_dist, pytest, transformers" 2>/dev/null || [ ! -x .venv/bin/ruff ]; then
    say "installing into .venv (first run: a few minutes)"
    .venv/bin/python -m pip install --upgrade pip 2>&1 | tail -n 1
    if ! .venv/bin/python -c "import torch" 2>/dev/null; then
        say "installing torch ${TORCH_VERSION:-2.13.0}"
        .venv/bin/python -m pip install --progress-bar on "torch==${TORCH_VERSION:-2.13.0}"
    fi
    say "installing offload_dist (editable) with its test extra"
    .venv/bin/python -m pip install --progress-bar on -e ".[test]"
fi
# torchao is used by the tensor-subclass tests only. It sits in its own folder, which only
# those tests put on sys.path: transformers imports torchao whenever it is installed, and on
# CPU builds of torch it logs library-load errors, which would clutter every command's output.
EXTRAS=.venv/extras
if [ "${1:-}" = test ] && [ ! -d "$EXTRAS/torchao" ]; then
    say "installing torchao into $EXTRAS (tensor-subclass tests only)"
    .venv/bin/python -m pip install --no-deps --target "$EXTRAS" "torchao>=0.10" 2>&1 | tail -n 1 \
        || say "torchao could not be installed: its tests will skip"
fi

case "${1:-}" in
    setup) ;;
    demo) shift; .venv/bin/offload-dist demo "$@" ;;
    test) shift
        say "ruff check (every file, offload_dist/distributed/ included)"
        .venv/bin/ruff check --quiet .
        say "pytest on ${PYTEST_WORKERS:-2} workers (about 3-5 minutes on 2 idle cores; time limits scale with OFFLOAD_DIST_TEST_TIME_SCALE, default 2)"
        .venv/bin/python -m pytest -n "${PYTEST_WORKERS:-2}" -q -p no:cacheprovider "$@" ;;
    *) echo "usage: bash launch/dev.sh setup|demo|test [args]" >&2; exit 2 ;;
esac
say "done. Use the environment with: source .venv/bin/activate   (or .venv/bin/offload-dist, .venv/bin/python)"
