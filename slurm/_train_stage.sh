# The body of the training sbatch scripts (prolong_64k.sh, prolong_512k.sh source it). Settings (see also
# slurm/_common.sh), all overridable from the environment at submission:
#   RECIPE         the recipe YAML                        (set by the calling script)
#   DATA_ROOT      folder of the indexed datasets the recipe's mix names (required unless the recipe has one)
#   RUN_DIR        the run's folder: ckpt/, metrics.jsonl, tb/, config.yaml, logs/ (default: CKPT_DIR when that
#                  is set, else runs/JOB_NAME)
#   CKPT_DIR       this run's checkpoints (default RUN_DIR/ckpt); a requeued job resumes from the newest one
#   INIT_CKPT      start the stage from this checkpoint (stage 1: the converted HF model; stage 2: stage 1's)
DATA_ROOT=${DATA_ROOT:-}
if [ -z "${RUN_DIR:-}" ]; then RUN_DIR=${CKPT_DIR:-$REPO/runs/${SLURM_JOB_NAME:-megaprolong}}; fi
CKPT_DIR=${CKPT_DIR:-$RUN_DIR/ckpt}
source "$REPO/slurm/_common.sh"
INIT_CKPT=${INIT_CKPT:-}
[ -z "$DATA_ROOT" ] || [ -d "$DATA_ROOT" ] || fail "data not found: DATA_ROOT=$DATA_ROOT"
[ -z "$INIT_CKPT" ] || [ -e "$INIT_CKPT" ] || fail "checkpoint not found: INIT_CKPT=$INIT_CKPT"
mkdir -p "$CKPT_DIR" "$RUN_DIR"
PROGRESS_DIR=$CKPT_DIR
echo "recipe $RECIPE, run folder $RUN_DIR, checkpoints $CKPT_DIR"

args=(--config "$RECIPE" "run.dir=$RUN_DIR" "checkpoint.dir=$CKPT_DIR" checkpoint.resume=auto)
[ -n "$DATA_ROOT" ] && args+=("data.root=$DATA_ROOT")
[ -n "$INIT_CKPT" ] && args+=("checkpoint.load=$INIT_CKPT")
# shellcheck disable=SC2206
args+=($EXTRA_ARGS)
run_torchrun megaprolong.train "${args[@]}"
