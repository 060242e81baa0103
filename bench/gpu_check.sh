#!/usr/bin/env bash
# On a GPU machine with torch, transformers and accelerate installed: the GPU tests,
# then the benchmark. Results go to ${OUT:-gpu-results}.
#   bash bench/gpu_check.sh tests     GPU tests only
#   bash bench/gpu_check.sh bench     benchmark only (reuses ${BENCH_DIR}/ckpt if present)
set -uo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-gpu-results}
BENCH_DIR=${BENCH_DIR:-/tmp/offload-dist-bench}
mkdir -p "$OUT"
what=${1:-all}
if [ "$what" = tests ] || [ "$what" = all ]; then
    nvidia-smi topo -m > "$OUT/topo.txt" 2>&1
    python3 -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'gpus', torch.cuda.device_count())" | tee "$OUT/versions.txt"
    python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py tests/test_gpu_dist.py 2>&1 | tee "$OUT/gpu_tests.log"
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
    # BENCH_TIMEOUT (seconds) stops the run early and still keeps what it measured.
    timeout "${BENCH_TIMEOUT:-0}" python3 bench/run.py --out "$BENCH_DIR" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log"
    cp "$BENCH_DIR"/results.json "$BENCH_DIR"/table.md "$OUT"/ 2>/dev/null
    # Traces and failure logs travel as one archive (bench/gputrace.py summarises a trace).
    (cd "$BENCH_DIR" && tar czf "$OUT/extra.tar.gz" --ignore-failed-read trace-*.gz fail-*.log 2>/dev/null)
fi
exit 0
