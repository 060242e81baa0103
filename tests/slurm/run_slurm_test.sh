#!/usr/bin/env bash
# Runs launch/slurm.sbatch on a real one-node Slurm cluster started on this machine.
#
#   bash tests/slurm/run_slurm_test.sh          # as root, on Debian/Ubuntu
#
# 1. installs slurmd, slurmctld, slurm-client and munge with apt-get if any is missing;
# 2. creates a munge key if there is none and starts munged (as the munge user) unless
#    one already answers;
# 3. writes a private slurm.conf (one node, 127.0.0.1, this machine's CPU count, no
#    cgroups, no accounting) and starts slurmctld and slurmd on free ports;
# 4. submits launch/slurm.sbatch with 2 CPU tasks running examples/quantize.py on a
#    generated small Llama, once per mode (LAUNCH=srun, LAUNCH=torchrun), and waits;
# 5. runs the same example in one process with --data-ranks 2 and checks that both
#    jobs saved exactly the same tensors;
# 6. stops the daemons it started (also on failure) and removes its files.
#
# Environment: PYTHON (interpreter with offload_dist importable; default python3),
# SLURM_TEST_JOB_TIMEOUT (seconds per job, default 300), SLURM_TEST_KEEP=1 (keep the
# work directory), SLURM_TEST_MODES (default "srun torchrun").
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PYTHON=${PYTHON:-python3}
job_timeout=${SLURM_TEST_JOB_TIMEOUT:-300}
read -ra modes <<<"${SLURM_TEST_MODES:-srun torchrun}"
t_start=$SECONDS

log() { printf '[slurm-test %4ds] %s\n' "$((SECONDS - t_start))" "$*"; }
die() { log "FAILED: $*"; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root: it installs packages and starts slurmctld, slurmd and munged"

work=$(mktemp -d /tmp/offload-dist-slurm.XXXXXX)
chmod 755 "$work"
pids=()  # daemons started here, stopped in reverse order on exit

cleanup() {
    local rc=$?
    if [ -n "${SLURM_CONF:-}" ] && command -v scancel >/dev/null; then
        scancel --quiet --name=offload-dist-test 2>/dev/null || true
    fi
    local i
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
        kill "${pids[i]}" 2>/dev/null || true
    done
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
        timeout 20 tail --pid="${pids[i]}" -f /dev/null 2>/dev/null || kill -9 "${pids[i]}" 2>/dev/null || true
    done
    if [ "$rc" -ne 0 ]; then
        for f in "$work"/munged.log "$work"/slurmctld.log "$work"/slurmd.log "$work"/job-*.out; do
            [ -f "$f" ] || f=${f%.log}.stderr  # the daemon failed before opening its log
            [ -s "$f" ] && { echo "---- $f (last 40 lines)"; tail -n 40 "$f"; }
        done
    fi
    if [ "${SLURM_TEST_KEEP:-0}" = 1 ]; then
        log "kept $work"
    else
        rm -rf "$work"
    fi
    log "daemons stopped; exit $rc"
}
trap cleanup EXIT

# ---------------------------------------------------------------- 1. packages
need=()
for cmd in slurmctld slurmd sbatch munged; do
    command -v "$cmd" >/dev/null || need+=("$cmd")
done
if [ ${#need[@]} -gt 0 ]; then
    log "installing slurmd slurmctld slurm-client munge (missing: ${need[*]})"
    pkgs=(slurmd slurmctld slurm-client munge)
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends "${pkgs[@]}" >"$work/apt.log" 2>&1 \
        || { apt-get update -q >>"$work/apt.log" 2>&1 \
             && apt-get install -y -q --no-install-recommends "${pkgs[@]}" >>"$work/apt.log" 2>&1; } \
        || { tail -n 20 "$work/apt.log"; die "apt-get install failed"; }
fi

# ---------------------------------------------------------------- 2. munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    key=/etc/munge/munge.key
    if [ ! -s "$key" ]; then
        log "creating $key"
        install -d -o munge -g munge -m 700 /etc/munge
        mungekey --create --keyfile="$key" 2>/dev/null || dd if=/dev/urandom of="$key" bs=1024 count=1 status=none
        chown munge:munge "$key"
        chmod 400 "$key"
    fi
    install -d -o munge -g munge -m 755 /run/munge
    install -d -o munge -g munge -m 700 /var/lib/munge /var/log/munge
    setpriv --reuid=munge --regid=munge --init-groups munged --foreground >"$work/munged.log" 2>&1 &
    pids+=("$!")
    for _ in $(seq 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break
        sleep 0.2
    done
    munge -n | unmunge >/dev/null || { cat "$work/munged.log"; die "munged does not answer"; }
    log "munged started (pid ${pids[-1]})"
fi

# ---------------------------------------------------------------- 3. slurm
host=$(hostname -s)
cpus=$(getconf _NPROCESSORS_ONLN)  # not nproc: nproc obeys OMP_NUM_THREADS
read -r ctld_port slurmd_port rdzv_port < <("$PYTHON" - <<'PY'
import socket
socks = [socket.socket() for _ in range(3)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
PY
)
mkdir -p "$work/state" "$work/spool"
export SLURM_CONF=$work/slurm.conf
cat >"$SLURM_CONF" <<CONF
ClusterName=offloadtest
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
SchedulerType=sched/backfill
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
StateSaveLocation=$work/state
SlurmdSpoolDir=$work/spool
SlurmctldPidFile=$work/slurmctld.pid
SlurmdPidFile=$work/slurmd.pid
SlurmctldLogFile=$work/slurmctld.log
SlurmdLogFile=$work/slurmd.log
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
PartitionName=test Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
slurmctld -D -c -i -f "$SLURM_CONF" >"$work/slurmctld.stderr" 2>&1 &
pids+=("$!")
slurmd -D -f "$SLURM_CONF" >"$work/slurmd.stderr" 2>&1 &
pids+=("$!")
state=
for _ in $(seq 150); do
    state=$(sinfo -h -N -o %T 2>/dev/null | head -n 1 || true)
    [ "$state" = idle ] && break
    sleep 0.2
done
[ "$state" = idle ] || die "node $host is '${state:-unknown}', not idle, after 30 s"
log "slurmctld and slurmd up: node $host, $cpus CPUs, ports $ctld_port/$slurmd_port"

# ---------------------------------------------------------------- 4. jobs
export PYTHON CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=1
export PYTHONPATH=$repo${PYTHONPATH:+:$PYTHONPATH}
model=$work/model
for mode in "${modes[@]}"; do
    if [ -f "$model/config.json" ]; then
        args=(--model "$model" --workdir "$work/run-$mode")
    else
        args=(--workdir "$work")  # the first job's rank 0 generates the model in $work/model
    fi
    args+=(--out "$work/out-$mode" --overwrite)
    t0=$SECONDS
    # srun mode meets on the job-id port init_dist() derives; torchrun mode on a free port.
    port_env=()
    [ "$mode" = torchrun ] && port_env=("MASTER_PORT=$rdzv_port")
    job=$(env LAUNCH="$mode" "${port_env[@]}" sbatch --parsable -n 2 --job-name=offload-dist-test --chdir="$work" \
        --output="$work/job-$mode.out" "$repo/launch/slurm.sbatch" "$repo/examples/quantize.py" "${args[@]}")
    # Polled here: sbatch --wait backs off to tens of seconds between polls.
    info=
    while [ $((SECONDS - t0)) -lt "$job_timeout" ]; do
        info=$(scontrol -o show job "$job" 2>/dev/null || true)
        [[ $info =~ JobState=(COMPLETED|FAILED|CANCELLED|TIMEOUT|NODE_FAIL|OUT_OF_MEMORY|BOOT_FAIL|DEADLINE) ]] && break
        sleep 0.5
    done
    [[ $info =~ JobState=([A-Z_]+) ]] && job_state=${BASH_REMATCH[1]} || job_state=UNKNOWN
    [[ $info =~ \ ExitCode=([0-9:]+) ]] && exit_code=${BASH_REMATCH[1]} || exit_code=unknown
    [ "$job_state" = COMPLETED ] || die "LAUNCH=$mode job $job: state $job_state, exit code $exit_code after $((SECONDS - t0)) s"
    grep -q '^saved ' "$work/job-$mode.out" || die "LAUNCH=$mode job saved nothing"
    log "LAUNCH=$mode: sbatch -n 2 job done in $((SECONDS - t0)) s"
done

# ---------------------------------------------------------------- 5. compare
t0=$SECONDS
"$PYTHON" "$repo/examples/quantize.py" --model "$model" --out "$work/out-single" --data-ranks 2 \
    --workdir "$work/run-single" --overwrite >"$work/single.out" 2>&1 \
    || { tail -n 30 "$work/single.out"; die "single-process run failed"; }
log "single process, --data-ranks 2: done in $((SECONDS - t0)) s"
"$PYTHON" - "$work" "${modes[@]}" <<'PY'
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file


def load(d: Path) -> dict:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    if not out:
        raise SystemExit(f"no tensors saved in {d}")
    return out


work, modes = Path(sys.argv[1]), sys.argv[2:]
want = load(work / "out-single")
for mode in modes:
    got = load(work / f"out-{mode}")
    if got.keys() != want.keys():
        raise SystemExit(f"LAUNCH={mode}: tensor names differ: {sorted(got.keys() ^ want.keys())[:5]}")
    bad = [k for k in want if got[k].dtype != want[k].dtype or not torch.equal(got[k], want[k])]
    if bad:
        raise SystemExit(f"LAUNCH={mode}: {len(bad)} tensors differ, e.g. {bad[:5]}")
    int8 = sum(t.dtype == torch.int8 for t in got.values())
    print(f"LAUNCH={mode}: {len(got)} tensors ({int8} int8) equal the single-process result")
PY
log "OK"
