#!/usr/bin/env bash
# Runs SCRIPT on this node with torchrun: one rank per visible GPU, or 2 CPU ranks
# without GPUs. The script calls offload_dist.init_dist(), which reads torchrun's
# variables. Several nodes: launch/slurm.sbatch, or torchrun with a rendezvous.
#
#   launch/torchrun.sh [--nproc N] SCRIPT [ARGS...]
#   launch/torchrun.sh examples/quantize.py --model /models/llama --out /scratch/llama-int8
#
# PYTHON: the interpreter that has torch and offload_dist (default: python3).
set -euo pipefail

PYTHON=${PYTHON:-python3}
usage="usage: $0 [--nproc N] SCRIPT [ARGS...]"
nproc=
case "${1:-}" in
    --nproc) nproc=${2:?$usage}; shift 2 ;;
    --nproc=*) nproc=${1#--nproc=}; shift ;;
    -h | --help) echo "$usage"; exit 0 ;;
esac
if [ $# -eq 0 ] || [[ $1 == -* ]]; then
    echo "$usage" >&2
    exit 2
fi
if [ -z "$nproc" ]; then
    nproc=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')
    [ "$nproc" -gt 0 ] || nproc=2
fi
exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$nproc" "$@"
