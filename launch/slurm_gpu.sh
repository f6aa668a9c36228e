#!/usr/bin/env bash
# One process per GPU node under SLURM; jax.distributed.initialize() reads SLURM_* variables.
#   sbatch --nodes=4 --gpus-per-node=8 launch/slurm_gpu.sh --config=configs/coca.py:base --workdir=/shared/run
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
set -euo pipefail
srun python3 -m mmjax.main --distributed "$@"
