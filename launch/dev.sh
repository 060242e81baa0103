#!/usr/bin/env bash
# Sets up .venv (once) and runs the demo or the tests.
#   bash launch/dev.sh demo     the main job on a generated small model (CPU)
#   bash launch/dev.sh test     the test suite (CPU; GPU tests are skipped without CUDA)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
# torch is pinned to the CPU build on CPU-only machines; on a GPU machine install the
# CUDA build of torch first (any version >= 2.6) and it is kept.
if ! .venv/bin/python -c "import offload_dist, pytest, transformers" 2>/dev/null || [ ! -x .venv/bin/ruff ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    if ! .venv/bin/python -c "import torch" 2>/dev/null; then
        .venv/bin/python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
    fi
    .venv/bin/python -m pip install -q -e ".[test]"
fi
case "${1:-}" in
    demo) shift; exec .venv/bin/offload-dist demo "$@" ;;
    test) shift
        .venv/bin/ruff check --quiet .   # lint first: every file, offload_dist/distributed/ included
        exec .venv/bin/python -m pytest -n "${PYTEST_WORKERS:-2}" -q -p no:cacheprovider "$@" ;;
    *) echo "usage: bash launch/dev.sh demo|test [args]" >&2; exit 2 ;;
esac
