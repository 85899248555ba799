#!/usr/bin/env bash
# Runs N jaxlm processes on this machine as one multi-process JAX job (emulated multi-host).
#
#   launch/local.sh N [args for python -m jaxlm.main ...]
#   launch/local.sh 2 --config=configs/tiny.py --workdir=/tmp/jaxlm_2proc --config.train.steps=20
#
# Every process gets JAXLM_COORDINATOR_ADDRESS=127.0.0.1:<free port>, JAXLM_NUM_PROCESSES=N and
# its own JAXLM_PROCESS_ID (0..N-1), which jaxlm.parallel.distributed.initialize reads; process 0 hosts
# the coordinator. Each process sees DEVICES_PER_PROCESS emulated CPU devices, so the job has
# N * DEVICES_PER_PROCESS devices. Output lines are prefixed with the rank ("[1] ..."). If one
# process fails, the others are stopped and the script exits with the failed process's status.
#
# Environment (all optional):
#   DEVICES_PER_PROCESS  emulated CPU devices per process (default 4)
#   PORT                 coordinator port on 127.0.0.1 (default: a free port)
#   PYTHON               interpreter (default python3)
#   MODULE               module run by each process (default jaxlm.main)
#   JAX_PLATFORMS        default cpu
#   XLA_FLAGS            kept, except that its device count is replaced by DEVICES_PER_PROCESS
#   GLIBC_TUNABLES       default glibc.malloc.hugetlb=1: XLA:CPU's large per-step temporaries
#                        on transparent huge pages (~7-10% faster steps, docs/benchmarks.md)
set -euo pipefail

usage() { echo "usage: $0 NUM_PROCESSES [args for python -m \${MODULE:-jaxlm.main} ...]" >&2; }
if [[ $# -lt 1 || ! $1 =~ ^[1-9][0-9]*$ ]]; then usage; exit 2; fi
num_processes=$1
shift

PYTHON=${PYTHON:-python3}
MODULE=${MODULE:-jaxlm.main}
DEVICES_PER_PROCESS=${DEVICES_PER_PROCESS:-4}
if [[ -z ${PORT:-} ]]; then
  # Bind port 0 and report what the kernel picked; it is released again before rank 0 binds it.
  PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi

cd "$(dirname "$0")/.."  # the repository root, so `-m jaxlm.main` and relative configs resolve
export JAXLM_COORDINATOR_ADDRESS="127.0.0.1:${PORT}"
export JAXLM_NUM_PROCESSES="$num_processes"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
export GLIBC_TUNABLES="${GLIBC_TUNABLES:-glibc.malloc.hugetlb=1}"
# Other XLA flags are kept; a device count already there (e.g. from a test run) is replaced.
xla_flags=$(sed -E 's/--xla_force_host_platform_device_count=[^ ]*//g; s/  +/ /g; s/^ //; s/ $//' \
  <<<"${XLA_FLAGS:-}")
export XLA_FLAGS="${xla_flags:+$xla_flags }--xla_force_host_platform_device_count=${DEVICES_PER_PROCESS}"
echo "local.sh: ${num_processes} x ${DEVICES_PER_PROCESS} devices, coordinator ${JAXLM_COORDINATOR_ADDRESS}: ${PYTHON} -m ${MODULE} $*" >&2

# Job control: each rank runs in a process group of its own, so stopping a rank also stops
# whatever it started (data-loader workers) and the pipe that prefixes its output.
set -m
pids=()

stop_all() {
  local pid
  for pid in "${pids[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
  for _ in $(seq 50); do  # up to 5 s to exit cleanly, then SIGKILL
    [[ -z $(jobs -pr) ]] && return 0
    sleep 0.1
  done
  for pid in "${pids[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
}
trap 'echo "local.sh: interrupted; stopping all processes" >&2; stop_all; exit 130' INT TERM

run_rank() {
  local rank=$1
  shift
  JAXLM_PROCESS_ID=$rank "$PYTHON" -u -m "$MODULE" "$@" 2>&1 |
    awk -v prefix="[$rank] " '{ print prefix $0; fflush() }'
  return "${PIPESTATUS[0]}"
}

for (( rank = 0; rank < num_processes; rank++ )); do
  run_rank "$rank" "$@" &
  pids+=("$!")
done
set +m  # the groups stay; this only silences bash's job-status lines ("Terminated ...")

# Wait for the processes in the order they finish; the first failure stops the rest.
status=0
for (( done_count = 0; done_count < num_processes; done_count++ )); do
  if wait -n; then continue; else status=$?; fi
  echo "local.sh: a process exited with status ${status}; stopping the others" >&2
  stop_all
  break
done
wait 2>/dev/null || true
exit "$status"
