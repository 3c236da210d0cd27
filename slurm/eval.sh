#!/usr/bin/env bash
# Evaluate an HF checkpoint on one node: sbatch slurm/eval.sh
# Settings (environment at submission; REPO, PYTHON, CONTAINER, CONTAINER_MOUNTS as in slurm/_env.sh):
#   MODEL      the HF model folder (megaprolong-sft or megaprolong-convert output)          (required)
#   OUT_DIR    results folder (default runs/eval/<model folder name>)
#   TASKS      comma-separated tasks (default: json_kv,niah_single,niah_multikey,niah_uuid,niah_multivalue,variable_tracking)
#   LENGTHS    comma-separated prompt lengths (default: 8192,16384,32768,65536,131072)
#   BACKEND    transformers (default) or vllm; TP: vLLM tensor parallel size (default: GPUs on the node)
#   PPL_DATA   indexed dataset PREFIX of held-out long documents: adds the perplexity-by-position task
#   EVAL_ARGS  more flags, e.g. "--samples 20 --chat-template on"
#SBATCH --job-name=megaprolong-eval
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=12:00:00
#SBATCH --output=logs/%x-%j.out
REPO=${REPO:-${SLURM_SUBMIT_DIR:-$(pwd)}}
source "$REPO/slurm/_env.sh"
MODEL=${MODEL:-}
[ -n "$MODEL" ] || fail "MODEL is not set (an HF model folder)"
[ -f "$MODEL/config.json" ] || fail "HF model not found: MODEL=$MODEL (no config.json)"
OUT_DIR=${OUT_DIR:-$REPO/runs/eval/$(basename "$MODEL")}
TASKS=${TASKS:-json_kv,niah_single,niah_multikey,niah_uuid,niah_multivalue,variable_tracking}
LENGTHS=${LENGTHS:-8192,16384,32768,65536,131072}
BACKEND=${BACKEND:-transformers}
TP=${TP:-${SLURM_GPUS_ON_NODE:-1}}
PPL_DATA=${PPL_DATA:-}
if [ -n "$PPL_DATA" ]; then
  [ -f "$PPL_DATA.idx" ] || fail "indexed dataset not found: PPL_DATA=$PPL_DATA (.idx missing)"
  TASKS="$TASKS,ppl"
fi
args=(--model "$MODEL" --tasks "$TASKS" --lengths "$LENGTHS" --out "$OUT_DIR" --backend "$BACKEND" --tp "$TP" --force)
[ -n "$PPL_DATA" ] && args+=(--ppl-data "$PPL_DATA")
echo "job ${SLURM_JOB_ID:-?}: evaluating $MODEL -> $OUT_DIR"
cd "$REPO"
# shellcheck disable=SC2086
srun "${container[@]}" "$PYTHON" -m megaprolong.eval "${args[@]}" ${EVAL_ARGS:-}
