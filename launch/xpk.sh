#!/usr/bin/env bash
# mmjax as an xpk workload on a GKE TPU cluster, one or several slices: xpk layers this
# checkout into a docker image (on --base-docker-image, or runs --docker-image as it is), and
# every host runs `pip install -e '.[gcs]' 'jax[tpu]' && python3 -m mmjax.main --distributed
# --config.mesh.dcn_data=SLICES ARGS...` (no install in a --docker-image). With several slices
# the data axis spans them (a hybrid ICI/DCN mesh; mesh.data etc. are then per-slice sizes);
# a --config.mesh.dcn_data in ARGS comes later and wins.
#
#   launch/xpk.sh --cluster my-cluster --tpu-type v5p-256 --num-slices 2 --config=configs/coca.py:base \
#       --workdir=gs://bucket/run
#   launch/xpk.sh --dry_run --cluster c --tpu-type v5litepod-16 --config=...   # print it (DRY_RUN=1 too)
#
# Options (xpk's own, before ARGS): --cluster and --tpu-type (required), --num-slices (1),
# --workload (mmjax-<time>), --project, --zone, --docker-image (one with mmjax installed),
# --base-docker-image (python:3.12). `--` ends the options.
set -euo pipefail

usage() {
  echo "usage: launch/xpk.sh [--dry_run] --cluster C --tpu-type T [--num-slices N] [--workload W] [--project P]" \
       "[--zone Z] [--docker-image I | --base-docker-image I] ARGS..." >&2
  exit 2
}

dry_run=${DRY_RUN:-0}
cluster="" tpu_type="" slices=1 workload="mmjax-$(date +%Y%m%d-%H%M%S)"
extra=()  # xpk options passed as they are
base_image=python:3.12 image=""
while [ $# -gt 0 ]; do
  case $1 in
    --dry_run) dry_run=1; shift; continue ;;
    --) shift; break ;;
    --*=*) opt=${1%%=*} value=${1#*=}; shift ;;
    --cluster|--tpu-type|--num-slices|--workload|--project|--zone|--docker-image|--base-docker-image)
      [ $# -ge 2 ] || usage; opt=$1 value=$2; shift 2 ;;
    *) break ;;
  esac
  case $opt in
    --cluster) cluster=$value ;;
    --tpu-type) tpu_type=$value ;;
    --num-slices) slices=$value ;;
    --workload) workload=$value ;;
    --project|--zone) extra+=("$opt" "$value") ;;
    --docker-image) image=$value ;;
    --base-docker-image) base_image=$value ;;
    *) set -- "$opt=$value" "$@"; break ;;  # not ours (e.g. --config=...): the first of ARGS
  esac
done
[ -n "$cluster" ] && [ -n "$tpu_type" ] || { echo "xpk.sh: --cluster and --tpu-type are required" >&2; usage; }
[[ $slices =~ ^[1-9][0-9]*$ ]] || { echo "xpk.sh: --num-slices '$slices' is not 1 or more" >&2; usage; }

command="python3 -m mmjax.main --distributed --config.mesh.dcn_data=$slices$(printf ' %q' "$@")"
if [ -n "$image" ]; then  # a ready image: mmjax is installed in it
  code=(--docker-image "$image")
else
  code=(--base-docker-image "$base_image" --script-dir "$(cd "$(dirname "$0")/.." && pwd)")
  command="python3 -m pip install -q -e '.[gcs]' 'jax[tpu]' && $command"
fi
cmd=(xpk workload create --cluster "$cluster" --workload "$workload" --tpu-type "$tpu_type" --num-slices "$slices"
     ${extra[@]+"${extra[@]}"} "${code[@]}" --command "$command")
if [ "$dry_run" = 1 ]; then printf '%q ' "${cmd[@]}"; echo; else "${cmd[@]}"; fi
