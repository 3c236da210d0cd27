#!/usr/bin/env bash
# Evaluate an HF checkpoint on one node, the way ProLong reports a model: sbatch slurm/eval.sh
# Settings (environment at submission; REPO, PYTHON, CONTAINER, CONTAINER_MOUNTS as in slurm/_env.sh):
#   MODEL         the HF model folder (megaprolong-sft or megaprolong-convert output)          (required)
#   OUT_DIR       results folder (default runs/eval/<model folder name>): OUT_DIR/long, short, helmet, report
#   SUITES        comma-separated: long (our recall tasks + ppl), short (lm-evaluation-harness), helmet
#                 (the HELMET adapter; needs HELMET_DIR, HELMET_PYTHON) (default: long,short)
#   TASKS         long suite: comma-separated tasks (default: json_kv,niah_single,niah_multikey,niah_uuid,niah_multivalue,variable_tracking)
#   LENGTHS       long suite and HELMET: prompt lengths (default: 8192,16384,32768,65536,131072)
#   BACKEND       long suite: transformers (default) or vllm; TP: vLLM tensor parallel size (default: GPUs on the node)
#   PPL_DATA      long suite: indexed dataset PREFIX of held-out long documents: adds the perplexity-by-position task
#   EVAL_ARGS     more flags for the long suite, e.g. "--samples 20 --chat-template on"
#   SHORT_TASKS   short suite: lm_eval tasks (default: hellaswag,mmlu,arc_challenge,winogrande,gsm8k)
#   SHORT_ARGS    more flags for it, e.g. "--data-dir /data/hf_cache --include-path my_tasks --limit 100"
#   HELMET_DIR, HELMET_PYTHON, HELMET_ARGS   the HELMET checkout, its interpreter, more adapter flags
#   BASE_RESULTS  a base model's OUT_DIR: the report shows each figure's difference from it
#   REPORT_LENGTHS  the lengths the report averages (default ProLong's: 32768,65536,131072)
#   LOCAL=1       run each command on this machine instead of through srun (megaprolong-pipeline run --local)
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
SUITES=${SUITES:-long,short}
TASKS=${TASKS:-json_kv,niah_single,niah_multikey,niah_uuid,niah_multivalue,variable_tracking}
LENGTHS=${LENGTHS:-8192,16384,32768,65536,131072}
BACKEND=${BACKEND:-transformers}
TP=${TP:-${SLURM_GPUS_ON_NODE:-1}}
PPL_DATA=${PPL_DATA:-}
SHORT_TASKS=${SHORT_TASKS:-hellaswag,mmlu,arc_challenge,winogrande,gsm8k}
BASE_RESULTS=${BASE_RESULTS:-}
if [ -n "$PPL_DATA" ]; then
  [ -f "$PPL_DATA.idx" ] || fail "indexed dataset not found: PPL_DATA=$PPL_DATA (.idx missing)"
  TASKS="$TASKS,ppl"
fi
[ -z "$BASE_RESULTS" ] || [ -d "$BASE_RESULTS" ] || fail "base results not found: BASE_RESULTS=$BASE_RESULTS"
for suite in ${SUITES//,/ }; do
  case "$suite" in
    long|short) ;;
    helmet) [ -d "${HELMET_DIR:-}" ] || fail "SUITES has helmet but HELMET_DIR is not a HELMET checkout: ${HELMET_DIR:-unset}" ;;
    *) fail "SUITES: unknown suite $suite (expected long, short, helmet)" ;;
  esac
done
echo "job ${SLURM_JOB_ID:-?}: evaluating $MODEL ($SUITES) -> $OUT_DIR"
cd "$REPO"
mkdir -p "$OUT_DIR"
if [ "${LOCAL:-0}" = 1 ]; then
  on_node() { "$PYTHON" -m megaprolong.eval "$@"; }
else
  on_node() { srun "${container[@]}" "$PYTHON" -m megaprolong.eval "$@"; }
fi
for suite in ${SUITES//,/ }; do
  echo "== $suite"
  case "$suite" in
    long)
      args=(--model "$MODEL" --tasks "$TASKS" --lengths "$LENGTHS" --out "$OUT_DIR/long" --backend "$BACKEND" --tp "$TP" --force)
      [ -n "$PPL_DATA" ] && args+=(--ppl-data "$PPL_DATA")
      # shellcheck disable=SC2086
      on_node "${args[@]}" ${EVAL_ARGS:-} ;;
    short)
      # shellcheck disable=SC2086
      on_node short --model "$MODEL" --tasks "$SHORT_TASKS" --out "$OUT_DIR/short" --force ${SHORT_ARGS:-} ;;
    helmet)
      # shellcheck disable=SC2086
      on_node helmet --helmet-dir "$HELMET_DIR" --python "${HELMET_PYTHON:-$PYTHON}" --model "$MODEL" \
        --lengths "$LENGTHS" --out "$OUT_DIR/helmet" --run ${HELMET_ARGS:-} ;;
  esac
done
echo "== report"
report=(report "$OUT_DIR" --out "$OUT_DIR/report" --lengths "${REPORT_LENGTHS:-32768,65536,131072}")
[ -n "$BASE_RESULTS" ] && report+=(--base "$BASE_RESULTS")
on_node "${report[@]}"
