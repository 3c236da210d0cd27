# The body of the training sbatch scripts (prolong_64k.sh, prolong_512k.sh source it). Settings (see also
# slurm/_common.sh), all overridable from the environment at submission:
#   RECIPE         the recipe YAML                        (set by the calling script)
#   DATA_ROOT      folder of the indexed datasets the recipe's mix names (required unless the recipe has one)
#   CKPT_DIR       this run's checkpoints; a requeued job resumes from the newest complete one
#   INIT_CKPT      start the stage from this checkpoint (stage 1: the converted HF model; stage 2: stage 1's)
source "$REPO/slurm/_common.sh"
DATA_ROOT=${DATA_ROOT:-}
CKPT_DIR=${CKPT_DIR:-$REPO/runs/${SLURM_JOB_NAME:-megaprolong}/ckpt}
INIT_CKPT=${INIT_CKPT:-}
[ -z "$DATA_ROOT" ] || [ -d "$DATA_ROOT" ] || fail "data not found: DATA_ROOT=$DATA_ROOT"
[ -z "$INIT_CKPT" ] || [ -e "$INIT_CKPT" ] || fail "checkpoint not found: INIT_CKPT=$INIT_CKPT"
mkdir -p "$CKPT_DIR"
PROGRESS_DIR=$CKPT_DIR
echo "recipe $RECIPE, checkpoints $CKPT_DIR"

args=(--config "$RECIPE" "checkpoint.dir=$CKPT_DIR" checkpoint.resume=auto)
[ -n "$DATA_ROOT" ] && args+=("data.root=$DATA_ROOT")
[ -n "$INIT_CKPT" ] && args+=("checkpoint.load=$INIT_CKPT")
# shellcheck disable=SC2206
args+=($EXTRA_ARGS)
run_torchrun megaprolong.train "${args[@]}"
