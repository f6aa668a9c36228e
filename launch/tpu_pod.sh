#!/usr/bin/env bash
# mmjax on every worker of a Cloud TPU VM pod slice, through gcloud: the code goes to ~/mmjax
# on each worker (this checkout's files, tracked and untracked-not-ignored, or a git clone with
# --repo), is installed there (pip install -e '.[gcs]' with jax[tpu]: gs:// workdirs), and `python3 -m mmjax.main
# --distributed ARGS...` runs on all workers at once; jax finds the coordinator and process ids
# from the TPU metadata, and each host feeds its own share of the batch.
#
#   launch/tpu_pod.sh my-v5p-64 us-east5-a --config=configs/coca.py:base --workdir=gs://bucket/run
#   launch/tpu_pod.sh --repo https://github.com/me/mmjax --ref main my-tpu us-east5-a --config=...
#   launch/tpu_pod.sh --dry_run my-tpu us-east5-a --config=...     # print the commands (DRY_RUN=1 too)
#
# Options (before TPU_NAME): --project P, --repo URL [--ref BRANCH_OR_TAG], --skip_install (the
# code and packages are already there: only run). Several slices: launch/xpk.sh.
set -euo pipefail

usage() {
  echo "usage: launch/tpu_pod.sh [--dry_run] [--project P] [--repo URL [--ref REF]] [--skip_install] TPU_NAME ZONE ARGS..." >&2
  exit 2
}

dry_run=${DRY_RUN:-0}
project=() repo="" ref="" install=1
while [ $# -gt 0 ]; do
  case $1 in
    --dry_run) dry_run=1; shift ;;
    --skip_install) install=0; shift ;;
    --project|--repo|--ref) [ $# -ge 2 ] || usage
      case $1 in --project) project=(--project "$2") ;; --repo) repo=$2 ;; --ref) ref=$2 ;; esac
      shift 2 ;;
    --*) echo "tpu_pod.sh: unknown option $1 before TPU_NAME" >&2; usage ;;
    *) break ;;
  esac
done
[ $# -ge 2 ] || usage
tpu=$1 zone=$2
shift 2

run() {  # the command, or with --dry_run its shell-quoted line
  if [ "$dry_run" = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi
}
on_all_workers() {  # remote shell command, on every worker at once
  run gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" ${project[@]+"${project[@]}"} --worker=all --command "$1"
}

# Quoted for the workers' shell: an argument with spaces or quotes arrives as it was typed here.
args=$(printf ' %q' "$@")
root=$(cd "$(dirname "$0")/.." && pwd)

if [ "$install" = 1 ]; then
  if [ -n "$repo" ]; then
    fetch="rm -rf ~/mmjax && git clone --depth 1 ${ref:+--branch $(printf %q "$ref") }$(printf %q "$repo") ~/mmjax"
  else
    tarball=${TMPDIR:-/tmp}/mmjax-$tpu.tar.gz
    if [ "$dry_run" = 1 ]; then
      echo "git -C $(printf %q "$root") ls-files -co --exclude-standard -z | tar -C $(printf %q "$root") --null -T - -czf $(printf %q "$tarball")"
    else
      git -C "$root" ls-files -co --exclude-standard -z | tar -C "$root" --null -T - -czf "$tarball"
    fi
    run gcloud compute tpus tpu-vm scp "$tarball" "$tpu:~/mmjax.tar.gz" --zone "$zone" ${project[@]+"${project[@]}"} --worker=all
    fetch="rm -rf ~/mmjax && mkdir -p ~/mmjax && tar -xzf ~/mmjax.tar.gz -C ~/mmjax"
  fi
  on_all_workers "$fetch && cd ~/mmjax && python3 -m pip install -q -e '.[gcs]' 'jax[tpu]'"
fi
on_all_workers "cd ~/mmjax && python3 -m mmjax.main --distributed$args"
