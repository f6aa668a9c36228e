#!/usr/bin/env bash
# mmjax on GPU nodes under SLURM: srun starts `python3 -m mmjax.main --distributed ARGS...` as
# one process per node (the default: each sees all its node's GPUs) or one per GPU, and
# jax.distributed reads the coordinator, process count and id from SLURM_* variables.
#
#   sbatch --nodes=4 --gpus-per-node=8 launch/slurm_gpu.sh --config=configs/coca.py:base --workdir=/shared/run
#   sbatch --nodes=4 --gpus-per-node=8 --ntasks-per-node=8 launch/slurm_gpu.sh ...   # one process per GPU
#   DRY_RUN=1 SLURM_NTASKS_PER_NODE=1 SLURM_GPUS_ON_NODE=8 launch/slurm_gpu.sh --config=...  # print the srun line
#
# Run from the repository (sbatch keeps the working directory) with mmjax installed
# (pip install -e .) in the python3 the nodes see; PYTHON overrides it. `--dry_run` as the first
# argument does what DRY_RUN=1 does.
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
set -euo pipefail

dry_run=${DRY_RUN:-0}
if [ "${1:-}" = --dry_run ]; then dry_run=1; shift; fi
python=${PYTHON:-python3}

per_node=${SLURM_NTASKS_PER_NODE:-1}
env=()
if [ "${per_node%%(*}" = 1 ] && [ -z "${JAX_LOCAL_DEVICE_IDS:-}" ]; then
  # jax would give a lone process only GPU SLURM_LOCALID (0): name them all.
  gpus=${SLURM_GPUS_ON_NODE:-$({ nvidia-smi -L 2>/dev/null || true; } | wc -l)}
  [ "$gpus" -ge 1 ] || { echo "slurm_gpu.sh: no GPUs on this node (SLURM_GPUS_ON_NODE unset, nvidia-smi found none)" >&2; exit 2; }
  env=(env "JAX_LOCAL_DEVICE_IDS=$(seq -s, 0 $((gpus - 1)))")
fi
# One process per GPU: jax gives each the GPU of its SLURM_LOCALID.
cmd=(srun --kill-on-bad-exit=1 ${env[@]+"${env[@]}"} "$python" -m mmjax.main --distributed "$@")
if [ "$dry_run" = 1 ]; then printf '%q ' "${cmd[@]}"; echo; else "${cmd[@]}"; fi
