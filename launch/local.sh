#!/usr/bin/env bash
# N mmjax processes on this machine, joined by jax.distributed over localhost, each with K
# simulated CPU devices: the multi-host code paths (several processes, gloo collectives,
# per-process data) on a laptop, before a pod.
#
#   launch/local.sh 2 --config=configs/clip.py --config.total_steps=4 --workdir=/tmp/run
#   launch/local.sh 4 --devices_per_process 2 --config=configs/coca.py --workdir=/tmp/run
#   launch/local.sh --dry_run 2 --config=configs/clip.py    # print the commands (DRY_RUN=1 too)
#
# Process i runs `python3 -m mmjax.main ARGS... --distributed --coordinator_address=localhost:PORT
# --num_processes=N --process_id=i` (PORT: a free one) with JAX_PLATFORMS=cpu and
# XLA_FLAGS=--xla_force_host_platform_device_count=K (default 4); its output lines are
# prefixed [p<i>]. Ctrl-C and SIGTERM go to every process (the trainer saves a checkpoint);
# when one process fails the others are stopped (SIGTERM, then SIGKILL after 5 s), and the exit
# status is the first failure's, 0 when all succeed.
# Environment: PYTHON (default python3); MMJAX_LOCAL_MODULE runs another module in place of
# mmjax.main (the tests' worker).
set -euo pipefail

usage() { echo "usage: launch/local.sh [--dry_run] N [--devices_per_process K] ARGS..." >&2; exit 2; }

dry_run=${DRY_RUN:-0}
devices=4
procs=""
while [ $# -gt 0 ]; do
  case $1 in
    --dry_run) dry_run=1; shift ;;
    --devices_per_process) [ $# -ge 2 ] || usage; devices=$2; shift 2 ;;
    --devices_per_process=*) devices=${1#*=}; shift ;;
    *) if [ -z "$procs" ]; then procs=$1; shift; else break; fi ;;
  esac
done
[[ $procs =~ ^[1-9][0-9]*$ ]] || { echo "local.sh: N='$procs' is not a number of processes (1 or more)" >&2; usage; }
[[ $devices =~ ^[1-9][0-9]*$ ]] || { echo "local.sh: --devices_per_process '$devices' is not 1 or more" >&2; usage; }
if ((BASH_VERSINFO[0] < 4 || (BASH_VERSINFO[0] == 4 && BASH_VERSINFO[1] < 3))); then
  echo "local.sh needs bash 4.3 or newer (wait -n); this is $BASH_VERSION (macOS: brew install bash)" >&2
  exit 2
fi

python=${PYTHON:-python3}
module=${MMJAX_LOCAL_MODULE:-mmjax.main}
port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])')
# Appended: XLA takes the last of a repeated flag, so K wins over a device count set outside.
xla_flags="${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$devices"

command_of() {  # i ARGS...: sets cmd to the command line of process i
  local i=$1; shift
  cmd=(env JAX_PLATFORMS=cpu "XLA_FLAGS=$xla_flags" PYTHONUNBUFFERED=1 "$python" -m "$module" "$@"
       --distributed "--coordinator_address=localhost:$port" "--num_processes=$procs" "--process_id=$i")
}

if [ "$dry_run" = 1 ]; then
  for ((i = 0; i < procs; i++)); do
    command_of "$i" "$@"
    printf '%q ' "${cmd[@]}"; echo
  done
  exit 0
fi

prefix() {  # i: copy stdin to stdout with "[p<i>] " before each line; outlives its process's signals
  trap '' INT TERM
  local line
  while IFS= read -r line || [ -n "$line" ]; do printf '[p%s] %s\n' "$1" "$line"; done
}

pids=()
stop() { local pid; for pid in "${pids[@]}"; do kill -"$1" -- "-$pid" 2>/dev/null || true; done; }
interrupted=0
trap 'interrupted=130; stop INT' INT
trap 'interrupted=143; stop TERM' TERM

# Job control while starting them: each process leads its own process group (with its
# children, e.g. data workers), which is what a signal is sent to, and keeps its default
# SIGINT. Off again so that bash does not report every ended job.
set -m
for ((i = 0; i < procs; i++)); do
  command_of "$i" "$@"
  "${cmd[@]}" > >(prefix "$i") 2>&1 &
  pids+=($!)
done
set +m

running() {  # is any of our processes still running?
  local pid jobs_now
  jobs_now=" $(jobs -rp | tr '\n' ' ') "
  for pid in "${pids[@]}"; do [[ $jobs_now == *" $pid "* ]] && return 0; done
  return 1
}

failed=0
killer=""
while running; do
  status=0
  wait -n || status=$?
  if [ "$status" -ne 0 ] && [ "$failed" -eq 0 ] && [ "$interrupted" -eq 0 ]; then
    failed=$status
    echo "local.sh: a process exited with status $status; stopping the others" >&2
    stop TERM
    # A process stuck in a collective with a dead peer may not answer SIGTERM. (No pipes held
    # open by the timer: a caller reading our output would wait for its sleep.)
    (sleep 5; stop KILL) < /dev/null > /dev/null 2>&1 &
    killer=$!
  fi
done
[ -z "$killer" ] || kill "$killer" 2>/dev/null || true
wait 2>/dev/null || true  # the last lines through the prefixes
[ "$interrupted" -eq 0 ] || exit "$interrupted"
exit "$failed"
