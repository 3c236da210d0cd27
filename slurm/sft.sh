#!/usr/bin/env bash
# ProLong's SFT stage on the converted 512K model: sbatch slurm/sft.sh
# (TRL SFTTrainer with FSDP2 across all GPUs; defaults below are for nodes of 8 H100-80GB). Settings (see
# also slurm/_common.sh), all overridable from the environment at submission:
#   RECIPE     the SFT recipe YAML (default examples/sft_ultrachat.yaml)
#   MODEL      the HF model to fine-tune (megaprolong-convert mcore-to-hf output)        (default: the recipe's)
#   SFT_DATA   chat data: jsonl / parquet / a datasets.save_to_disk folder (HF `messages` layout)
#   SFT_MDS    or ProLong's tokenized shards (prolong-ultrachat-64K)
#   OUT_DIR    checkpoints go to OUT_DIR/checkpoints (a requeued job resumes), the final model to OUT_DIR/model
#SBATCH --job-name=prolong-sft
#SBATCH --nodes=8
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
RECIPE=${RECIPE:-$REPO/examples/sft_ultrachat.yaml}
source "$REPO/slurm/_common.sh"
MODEL=${MODEL:-}
SFT_DATA=${SFT_DATA:-}
SFT_MDS=${SFT_MDS:-}
OUT_DIR=${OUT_DIR:-$REPO/runs/${SLURM_JOB_NAME:-prolong-sft}}
[ -z "$MODEL" ] || [ -f "$MODEL/config.json" ] || fail "HF model not found: MODEL=$MODEL (no config.json)"
[ -z "$SFT_DATA" ] || [ -e "$SFT_DATA" ] || fail "SFT data not found: SFT_DATA=$SFT_DATA"
[ -z "$SFT_MDS" ] || [ -e "$SFT_MDS" ] || fail "SFT shards not found: SFT_MDS=$SFT_MDS"
mkdir -p "$OUT_DIR"
PROGRESS_DIR=$OUT_DIR  # where megaprolong-sft records the step it is at (repeated failures stop the job)

args=(--config "$RECIPE" "output_dir=$OUT_DIR")
[ -n "$MODEL" ] && args+=("model=$MODEL")
[ -n "$SFT_DATA" ] && args+=("data.path=$SFT_DATA" "data.mds=null")
[ -n "$SFT_MDS" ] && args+=("data.mds=$SFT_MDS" "data.path=null")
# shellcheck disable=SC2206
args+=($EXTRA_ARGS)
run_torchrun megaprolong.sft "${args[@]}"
