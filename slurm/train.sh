#!/usr/bin/env bash
# A training stage of any recipe: RECIPE=examples/prolong_64k.yaml sbatch slurm/train.sh (settings: see
# slurm/_train_stage.sh; megaprolong-pipeline submits its stages with it, --nodes from the pipeline)
#SBATCH --job-name=megaprolong-train
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@600
REPO=${REPO:-${SLURM_SUBMIT_DIR:-$(pwd)}}
[ -n "${RECIPE:-}" ] || { echo "error: RECIPE is not set (a training recipe YAML)" >&2; exit 2; }
source "$REPO/slurm/_train_stage.sh"
