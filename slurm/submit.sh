#!/usr/bin/env bash
# slurm/submit.sh SCRIPT [sbatch options...]: sbatch a training or SFT script so that only one job at a time
# writes its run folder: the job is named after the folder (CKPT_DIR, or RUN_DIR/ckpt, for the training
# scripts; OUT_DIR for sft.sh) and submitted with --dependency=singleton, so a second submission on the same folder waits for the
# first to end instead of running beside it (the folder's lock refuses such a job anyway). Prints the job id.
#   CKPT_DIR=/ckpt/stage1 DATA_ROOT=/data INIT_CKPT=/ckpt/llama3 slurm/submit.sh slurm/prolong_64k.sh --nodes=2
set -euo pipefail
script=${1:?usage: slurm/submit.sh SCRIPT [sbatch options...]}
shift
folder=${CKPT_DIR:-${RUN_DIR:+$RUN_DIR/ckpt}}
folder=${folder:-${OUT_DIR:-}}
[ -n "$folder" ] || { echo "error: set RUN_DIR or CKPT_DIR (training), or OUT_DIR (SFT): the job's name comes from it" >&2; exit 2; }
mkdir -p "$folder"
folder=$(cd "$folder" && pwd -P)
name="mp-$(basename "$folder")-$(printf '%s' "$folder" | sha1sum | cut -c1-8)"
sbatch --parsable --job-name="$name" --dependency=singleton --export=ALL "$@" "$script"
