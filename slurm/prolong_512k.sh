#!/usr/bin/env bash
# ProLong stage (512k): sbatch slurm/prolong_512k.sh   (settings: see slurm/_train_stage.sh; defaults below
# are for nodes of 8 H100-80GB; override with sbatch options, e.g. sbatch --nodes=4 slurm/prolong_512k.sh)
#SBATCH --job-name=prolong-512k
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@600
REPO=${REPO:-${SLURM_SUBMIT_DIR:-$(pwd)}}
RECIPE=${RECIPE:-$REPO/examples/prolong_512k.yaml}
source "$REPO/slurm/_train_stage.sh"
